"""The model as the planner sees it: an ordered list of blocks (embedding, decoder layers, output
head, MTP modules), each with its parameters (replicated or expert-sharded), its forward FLOPs per
token split by the precision they can run at, and the activations it keeps for the backward.

Parameters and FLOPs come from `nanoseek.cost` (the same exact counts `nanoseek cost` prints); the
tests check that the blocks add up to `cost.params` and `cost.forward_flops_per_token`. Activations
are counted per token from the tensors a straightforward implementation (nanoseek's own) saves for
the backward: the inputs of every matmul and nonlinearity, attention's q, k, v, output and
log-sum-exp (a fused attention kernel: no T x T matrix), the router's scores and the loss's
log-probabilities. Each term says which recomputation drops it (DeepSeek-V3 technical report §3.2.3
recomputes all RMSNorms and the MLA up-projections; §3.3.4 caches SwiGLU's input and recomputes its
output)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanoseek.cost import arch, attention_flops_per_token
from nanoseek.cost.models import as_dict

RECOMPUTE = ("none", "selective", "full")
SELECTIVE = ("norm", "mla_up", "swiglu")  # what recompute="selective" drops
# Which tensors are kept: "nanoseek" = what nanoseek's own implementation keeps (checked against
# measured memory by `nanoseek plan --calibrate`); "v3" = DeepSeek-V3's documented savings (technical
# report §3.3.4: SwiGLU inputs in MoE cached in FP8) plus one assumption of ours, stated wherever it
# is used: the routed experts' outputs are not kept (the routing-weight gradient <dy, W_down h> equals
# <W_down^T dy, h>: the down-projection's input gradient dotted with its input h, the SwiGLU output V3
# recomputes anyway, so the expert side can form it without the output).
ACTIVATION_PROFILES = ("nanoseek", "v3")


@dataclass(frozen=True)
class Act:
    """One kept activation: `elements` per token; `kind` sets its bytes (act, linear_in, fp32, index);
    `dropped_by` names the selective recomputation that regenerates it in the backward instead."""
    name: str
    elements: float
    kind: str = "act"
    dropped_by: str = ""
    loss: bool = False  # logits and log-probabilities: held for one micro-batch whatever the schedule
    unit: str = ""      # the unit a calibrated CPU times whole ("attention", "head+loss", "experts"; time.py)


@dataclass(frozen=True)
class Block:
    name: str
    dense_params: int        # replicated across expert parallelism
    expert_params: int       # routed experts: split over the EP group
    gemm_flops: float        # forward FLOPs/token of linear layers that may run at the low-precision peak
    high_mm_flops: float     # forward FLOPs/token of matmuls kept in high precision (router, output head)
    core_flops: float        # forward FLOPs/token of the attention core (q.k, p.v): no weights
    recompute_flops: float   # extra forward FLOPs/token under recompute="selective" (MLA up-projections)
    acts: tuple[Act, ...]
    moe: bool = False
    layer: bool = False      # a decoder layer (counts for pipeline splits)
    hidden: int = 0          # model width (the residual stream's numbers per token)
    top_k: int = 0           # routed experts per token (MoE blocks)

    @property
    def forward_flops(self) -> float:
        return self.gemm_flops + self.high_mm_flops + self.core_flops


def _norm_acts(width: float, label: str) -> list[Act]:
    """An RMSNorm keeps its input, its normalised input (for the weight's gradient) and its output
    (the next matmul's input)."""
    return [Act(f"{label} norm input", width), Act(f"{label} norm, normalised input", width, "act", "norm"),
            Act(f"{label} norm output", width, "linear_in", "norm")]


def _core_acts(h: int, dv: int, seq_len: int, kernel: str) -> list[Act]:
    """A fused kernel (FlashAttention-style) keeps the output and the log-sum-exp; the math kernel
    (torch's SDPA on CPU) keeps the softmax probabilities, T per head per token, instead."""
    if kernel == "math":
        return [Act("attention probabilities (math kernel)", h * seq_len, unit="attention")]
    return [Act("attention output", h * dv), Act("attention log-sum-exp", h, "fp32")]


def _attention_acts(c: dict[str, Any], mla: bool, seq_len: int, kernel: str) -> list[Act]:
    d, h = c["hidden_size"], c["num_attention_heads"]
    acts = _norm_acts(d, "attention")
    if mla:
        rq, rkv, dr = c.get("q_lora_rank"), c["kv_lora_rank"], c["qk_rope_head_dim"]
        dn, dv = c["qk_nope_head_dim"], c["v_head_dim"]
        if rq:
            acts += _norm_acts(rq, "q latent")
        acts += [Act("kv_a_proj output (latent + RoPE key)", rkv + dr),
                 Act("kv latent norm, normalised input", rkv, "act", "norm"),
                 Act("kv latent norm output", rkv, "linear_in", "norm"),
                 Act("q (up-projected, RoPE)", h * (dn + dr), "act", "mla_up"),
                 Act("k (up-projected + shared RoPE key)", h * (dn + dr), "act", "mla_up"),
                 Act("kv_b_proj output (holds v)", h * (dn + dv), "act", "mla_up"),
                 *_core_acts(h, dv, seq_len, kernel), Act("o_proj input", h * dv, "linear_in")]
    else:
        kv, hd = c.get("num_key_value_heads") or h, c.get("head_dim") or d // h
        acts += [Act("q (RoPE)", h * hd), Act("k (RoPE)", kv * hd), Act("v", kv * hd),
                 *_core_acts(h, hd, seq_len, kernel), Act("o_proj input", h * hd, "linear_in")]
    return acts


def _swiglu_acts(width: float, label: str, moe: bool = False, unit: str = "") -> list[Act]:
    return [Act(f"{label} gate and up outputs", 2 * width, "swiglu_in" if moe else "act", unit=unit),
            Act(f"{label} silu output", width, "act", "swiglu", unit=unit),
            Act(f"{label} down_proj input", width, "linear_in", "swiglu", unit=unit)]


def _ffn_acts(c: dict[str, Any], moe: bool) -> list[Act]:
    acts = _norm_acts(c["hidden_size"], "FFN")
    d = c["hidden_size"]
    if not moe:
        return acts + _swiglu_acts(c["intermediate_size"], "FFN")
    k, e, ie = c["num_experts_per_tok"], c["n_routed_experts"], c["moe_intermediate_size"]
    acts += [Act("router scores", e, "fp32"), Act("routing weights", k, "fp32"),
             Act("routing indices (token order and expert order)", 2 * k, "index"),
             Act("dispatched rows (expert input)", k * d, "linear_in"),
             *_swiglu_acts(k * ie, "experts", True, "experts"),
             Act("expert outputs (combine input)", k * d, "act", "v3")]
    if c.get("n_shared_experts"):
        acts += _swiglu_acts(c["n_shared_experts"] * ie, "shared expert", True)
    return acts


def _loss_acts(c: dict[str, Any], label: str) -> list[Act]:
    d, v = c["hidden_size"], c["vocab_size"]
    return _norm_acts(d, label) + [
            Act(f"{label} logits", v, "act", "", True, "head+loss"),
            Act(f"{label} log-probabilities", v, "fp32", "", True, "head+loss")]


def _is_moe(c: dict[str, Any], i: int) -> bool:
    return bool(c.get("n_routed_experts")) and i >= c.get("first_k_dense_replace", 0) \
        and i % (c.get("moe_layer_freq") or 1) == 0


ATTENTION_KERNELS = ("fused", "math")


def blocks(cfg: Any, seq_len: int, *, include_mtp: bool = True, attention_kernel: str = "fused") -> list[Block]:
    """The model's blocks in pipeline order. `seq_len` sets the causal attention core's FLOPs (and, with
    the math kernel, its kept probabilities)."""
    c = dict(as_dict(cfg))
    a = arch(c)
    mla = a.attention == "MLA"
    c.setdefault("model_type", a.model_type)
    d, v = a.hidden_size, a.vocab_size
    core = attention_flops_per_token(c, seq_len) / len(a.layers)
    up = 0.0
    if mla:
        h, rq = c["num_attention_heads"], c.get("q_lora_rank")
        q_up = rq * h * a.qk_head_dim if rq else 0
        up = 2 * (q_up + c["kv_lora_rank"] * h * (c["qk_nope_head_dim"] + a.v_head_dim))

    def layer(i: int, part, extra_acts: list[Act], name: str) -> Block:
        moe = _is_moe(c, i)
        routed = c["n_routed_experts"] * 3 * d * c["moe_intermediate_size"] if moe else 0
        gate = 2 * c["n_routed_experts"] * d if moe else 0
        acts = extra_acts + _attention_acts(c, mla, seq_len, attention_kernel) + _ffn_acts(c, moe)
        return Block(name, part.total - routed, routed, 2 * part.matmul - gate, gate, core, up,
                     tuple(acts), moe, True, d, c["num_experts_per_tok"] if moe else 0)

    out = [Block("embedding", a.embedding, 0, 0.0, 0.0, 0.0, 0.0, (), hidden=d)]
    out += [layer(i, p, [], f"layer {i} ({'MoE' if _is_moe(c, i) else 'dense'})") for i, p in enumerate(a.layers)]
    head = 0 if a.tied else a.head_matmul
    out.append(Block("final norm + output head", head + d, 0, 0.0, 2 * a.head_matmul, 0.0, 0.0,
                     tuple(_loss_acts(c, "final")), hidden=d))
    if include_mtp:
        n = len(a.layers)
        for k, part in enumerate(a.mtp, start=1):
            # an MTP module: enorm/hnorm, eh_proj over [emb; hidden], one decoder layer, shared head norm;
            # it runs the shared output head once more (its matmul FLOPs, no parameters of its own)
            mtp_in = _norm_acts(d, f"MTP {k} embedding") + _norm_acts(d, f"MTP {k} hidden")
            blk = layer(n + k - 1, part, mtp_in, f"MTP module {k}")
            out.append(Block(blk.name, blk.dense_params, blk.expert_params, blk.gemm_flops,
                             blk.high_mm_flops + 2 * a.head_matmul, blk.core_flops, blk.recompute_flops,
                             blk.acts + tuple(_loss_acts(c, f"MTP {k}")), blk.moe, False, d, blk.top_k))
    return out


def act_bytes_per_token(block: Block, recompute: str, sizes: dict[str, float], *, loss: bool = False,
                        profile: str = "nanoseek") -> float:
    """Bytes per token `block` keeps for the backward under `recompute` ("none" or "selective"; "full"
    keeps only each layer's input: see `memory`) and the activation `profile`, counting its loss
    activations (`loss=True`) or the others. `sizes`: bytes per kind (act, linear_in, swiglu_in, fp32,
    index)."""
    kept = [a for a in block.acts if a.loss == loss
            and not (recompute == "selective" and a.dropped_by in SELECTIVE)
            and not (profile == "v3" and a.dropped_by == "v3")]
    return sum(a.elements * sizes[a.kind] for a in kept)
