"""A model's architecture as cost accounting sees it (`Arch`): parameters per block, split into
the weights a token multiplies by and the norm/bias numbers that cost no matmul FLOPs, for MLA + MoE
(DeepSeek-V3 / V2) and GQA + dense (Llama / Qwen2 / Mistral) models alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanoseek.config import ModelConfig
from nanoseek.cost.models import as_dict
from nanoseek.errors import UserError, require

MLA_TYPES = ("deepseek_v3", "deepseek_v2")
GQA_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class Part:
    """Parameters of one block. `matmul` = weights one token multiplies by (2 FLOPs each per forward);
    `active - matmul` are norm scales and biases, which cost no matmul FLOPs."""
    total: int
    active: int
    matmul: int

    def __add__(self, other: "Part") -> "Part":
        return Part(self.total + other.total, self.active + other.active, self.matmul + other.matmul)


def _dense(n: int, other: int = 0) -> Part:
    """A block whose `n` matmul weights are all used by every token, plus `other` norm/bias numbers."""
    return Part(n + other, n + other, n)


@dataclass(frozen=True)
class Arch:
    """What cost accounting needs to know about a model, for MLA + MoE and GQA + dense alike."""
    model_type: str
    attention: str            # "MLA" or "GQA"
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    qk_head_dim: int          # per-head width of the q.k score product
    v_head_dim: int           # per-head width of the p.v value product
    kv_cache_per_layer: int   # numbers cached per token per layer
    tied: bool
    layers: tuple[Part, ...]  # main-model decoder layers (attention + FFN + their two norms)
    mtp: tuple[Part, ...]     # MTP modules (eh_proj + one decoder layer + norms), shared parts excluded
    ffn_desc: str

    @property
    def embedding(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_matmul(self) -> int:  # the output head is a matmul even when tied to the embedding
        return self.vocab_size * self.hidden_size


def _get(c: dict[str, Any], key: str, default: Any = ...) -> Any:
    value = c.get(key, default)
    if value is ...:
        raise UserError(f"config ({c.get('model_type', 'unknown model_type')}) is missing field `{key}`")
    return value


def _model_type(c: dict[str, Any]) -> str:
    mt = c.get("model_type")
    if mt is None:  # no model_type: recognise the family by its fields
        mt = "deepseek_v3" if "kv_lora_rank" in c else "llama" if "num_attention_heads" in c else None
    if mt in MLA_TYPES or mt in GQA_TYPES:
        return mt
    raise UserError(f"unsupported model_type {mt!r}; supported: {', '.join(MLA_TYPES + GQA_TYPES)}")


def _mla_attention(c: dict[str, Any]) -> Part:
    d, h, rq = _get(c, "hidden_size"), _get(c, "num_attention_heads"), c.get("q_lora_rank")
    rkv, dn, dr, dv = (_get(c, k) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    q = d * rq + rq * h * (dn + dr) if rq else d * h * (dn + dr)  # q_a_proj + q_b_proj, or q_proj
    kv = d * (rkv + dr) + rkv * h * (dn + dv)                      # kv_a_proj_with_mqa + kv_b_proj
    o = h * dv * d
    norms = (rq or 0) + rkv                                         # q_a_layernorm, kv_a_layernorm
    bias = ((rq or 0) + rkv + dr + d) if c.get("attention_bias") else 0  # q_a, kv_a and o_proj biases
    return _dense(q + kv + o, norms + bias)


def _gqa_attention(c: dict[str, Any]) -> Part:
    d, h = _get(c, "hidden_size"), _get(c, "num_attention_heads")
    kv, hd = c.get("num_key_value_heads") or h, c.get("head_dim") or d // h
    weights = d * h * hd + 2 * d * kv * hd + h * hd * d             # q, k, v, o projections
    # Qwen2 always has q/k/v biases; Llama/Mistral have q/k/v/o biases only with attention_bias.
    bias = h * hd + 2 * kv * hd if c["model_type"] == "qwen2" else 0
    if c.get("attention_bias"):
        bias = h * hd + 2 * kv * hd + d
    return _dense(weights, bias)


def _check(c: dict[str, Any]) -> None:
    """Refuse an impossible architecture before counting it, naming the field: MLA + MoE configs get
    the model's own validation (e.g. n_group must divide n_routed_experts), GQA configs the checks
    their formulas rely on."""
    if c["model_type"] in MLA_TYPES:
        ModelConfig.from_dict(c)
        return
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        value = _get(c, key)
        require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{key} (config)", value, "a positive integer")
    kv = c.get("num_key_value_heads") or c["num_attention_heads"]
    require(isinstance(kv, int) and kv > 0 and c["num_attention_heads"] % kv == 0,
            "num_key_value_heads (config)", kv, f"a divisor of num_attention_heads={c['num_attention_heads']}")


def _is_moe_layer(c: dict[str, Any], i: int) -> bool:
    """DeepSeek's rule (HF DeepseekV3 / nanoseek ModelConfig.is_moe_layer)."""
    return bool(c.get("n_routed_experts")) and i >= c.get("first_k_dense_replace", 0) \
        and i % (c.get("moe_layer_freq") or 1) == 0


def _ffn(c: dict[str, Any], i: int) -> Part:
    d = _get(c, "hidden_size")
    if not _is_moe_layer(c, i):
        ff = _get(c, "intermediate_size")
        bias = 2 * ff + d if c.get("mlp_bias") else 0
        return _dense(3 * d * ff, bias)                                # gate, up, down
    expert = 3 * d * _get(c, "moe_intermediate_size")
    routed, shared = c["n_routed_experts"], c.get("n_shared_experts") or 0
    k = _get(c, "num_experts_per_tok")
    gate = routed * d                                                  # router: one score per expert
    active = (k + shared) * expert + gate                              # a token runs top-k + shared
    return Part((routed + shared) * expert + gate, active, active)


def _layer(c: dict[str, Any], i: int, attention: Part) -> Part:
    return attention + _ffn(c, i) + _dense(0, 2 * c["hidden_size"])   # + input/post-attention norms


def arch(cfg: Any) -> Arch:
    """Normalise any supported config into an `Arch`."""
    c = dict(as_dict(cfg))
    c["model_type"] = _model_type(c)
    n, d, h = _get(c, "num_hidden_layers"), _get(c, "hidden_size"), _get(c, "num_attention_heads")
    _check(c)
    if c["model_type"] in MLA_TYPES:
        attention = _mla_attention(c)
        dqk, dv = _get(c, "qk_nope_head_dim") + _get(c, "qk_rope_head_dim"), _get(c, "v_head_dim")
        kv_heads, kv_cache = h, _get(c, "kv_lora_rank") + _get(c, "qk_rope_head_dim")
        # MTP module k sits at layer index n + k: enorm, hnorm, eh_proj (2d -> d), a block, a final norm.
        mtp = tuple(_layer(c, n + k, attention) + _dense(2 * d * d, 3 * d)
                    for k in range(c.get("num_nextn_predict_layers", c.get("num_mtp_layers")) or 0))
    else:
        attention, mtp = _gqa_attention(c), ()
        dqk = dv = c.get("head_dim") or d // h
        kv_heads = c.get("num_key_value_heads") or h
        kv_cache = 2 * kv_heads * dqk
    layers = tuple(_layer(c, i, attention) for i in range(n))
    return Arch(c["model_type"], "MLA" if c["model_type"] in MLA_TYPES else "GQA", d, _get(c, "vocab_size"),
                h, kv_heads, dqk, dv, kv_cache, bool(c.get("tie_word_embeddings")), layers, mtp, _ffn_desc(c))


def _ffn_desc(c: dict[str, Any]) -> str:
    if not c.get("n_routed_experts"):
        return f"dense {c['intermediate_size']}"
    return (f"MoE {c.get('n_shared_experts') or 0}+{c['n_routed_experts']} x {c['moe_intermediate_size']}, "
            f"top-{c['num_experts_per_tok']}")
