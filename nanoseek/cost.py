"""Cost and efficiency accounting: parameters, FLOPs, KV cache, memory, GPU-hours, dollars and MFU.

Works on nanoseek `ModelConfig` objects, raw Hugging Face `config.json` dicts of the DeepseekV3 /
DeepseekV2 (MLA + MoE) and Llama / Qwen2 / Mistral (GQA, dense) families, preset names
(`nanoseek.config.PRESETS`) and the bundled configurations in `nanoseek/configs/`.

Conventions (every number this module prints follows them):
- **Parameters.** `params_total` counts every weight of the main model once (embedding table, output
  head unless tied, norms, biases, all experts). `params_active` counts the weights one token uses:
  everything except the routed experts it was not sent to and except the input embedding table (a
  lookup reads one row of it); the output head is included. This is the convention that reproduces
  DeepSeek's published "37B active" (V3), "21B" (V2) and "2.4B" (V2-Lite). `*_with_embed` adds the
  embedding table back; `*_no_embed` removes both the embedding table and the output head.
  MTP modules (`num_nextn_predict_layers`) are *not* in these totals; they are reported separately as
  `params_mtp_total` / `params_mtp_active` (their own weights only: the embedding and output head are
  shared with the main model; DeepSeek's checkpoint stores copies of both, which is how its "14B of MTP
  weights" arises). The MoE bias `e_score_correction_bias` is a buffer and is not counted.
- **FLOPs.** 2 FLOPs per multiply-accumulate. Forward FLOPs per token = 2 x (weights in matmuls that
  token goes through: attention projections, dense FFN or shared + top-k routed experts, the router
  gate, the output head) + the attention core. The embedding lookup, norms, activations, softmax,
  biases and RoPE are free. The attention core (scores q.k and the value product p.v) is
  `2 * heads * (qk_head_dim + v_head_dim) * ctx` per token per layer, with `ctx = seq_len / 2` for
  causal attention (it counts half of the T x T matrices) and `ctx = seq_len` with `causal=False`.
  MLA is counted on its training ("naive") path: keys/values are expanded per head by `kv_b_proj`.
  Training = 3 x forward (the backward pass costs two forwards: gradients w.r.t. inputs and weights).
  MTP is excluded unless `include_mtp=True` (the published per-token figures exclude it); each MTP
  module adds its eh_proj, one transformer block and one more pass through the shared output head,
  counted per token at the same seq_len (module k really sees T - k positions: a k/T overcount).
- **KV cache.** Per token, main-model layers only: MLA caches the latent and the shared RoPE key,
  `(kv_lora_rank + qk_rope_head_dim) * layers * bytes`; GQA caches `2 * kv_heads * head_dim * layers
  * bytes`.
- **Memory.** Weights at `weight_dtype` (bf16: 2 bytes); training state adds fp32 master weights (4),
  two AdamW moments (4 each) and gradients (2), all per parameter and configurable. MTP weights are
  included (they are trained and held). GB/TB are decimal (1e9 / 1e12 bytes).
- **Time and money.** `gpu_hours = tokens * train_flops_per_token / (peak_flops * mfu) / 3600`,
  dollars = gpu_hours x $/GPU-hour. `mfu = tokens_per_s * flops_per_token / (peak_flops * n_gpus)`.
  Peaks come from `configs/hardware.json` (dense tensor-core TFLOPS); `comm_sms` removes SMs reserved
  for communication (DeepSeek-V3 used 20 of the H800's 132), scaling the peak by (sms - comm_sms)/sms.

For the trainer: per-token training FLOPs of a `ModelConfig` at sequence length T, counting the MTP
modules the model actually runs, and the MFU of a measured throughput::

    from nanoseek import cost
    fpt = cost.train_flops_per_token(cfg, seq_len=T, include_mtp=cfg.num_nextn_predict_layers > 0)
    peak = cost.peak_flops("H100", "bf16")              # or the device's own peak in FLOP/s
    print(f"MFU {cost.mfu(tokens_per_s, fpt, peak):.1%}")  # tokens_per_s per GPU (or pass n_gpus=)

`measured_forward_flops(model, input_ids)` counts what torch's FlopCounterMode sees on a real model;
the tests check the formula against it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
HARDWARE_FILE = CONFIG_DIR / "hardware.json"

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
               "fp8": 1, "float8": 1, "int8": 1, "int4": 0.5}

MLA_TYPES = ("deepseek_v3", "deepseek_v2")
GQA_TYPES = ("llama", "qwen2", "mistral")

# Published figures for the bundled models (REFERENCE.md section 7, seeds/) and, where our calculator
# differs from one by more than 3%, why. Compared, never used in a calculation.
PUBLISHED: dict[str, dict[str, float]] = {
    "deepseek-v3": {"params_total": 671e9, "params_active": 37e9, "kv_cache_bytes_per_token": 70272,
                    "train_flops_per_token": 250e9},
    "deepseek-v2": {"params_total": 236e9, "params_active": 21e9, "train_flops_per_token": 155e9},
    "deepseek-v2-lite": {"params_total": 15.7e9, "params_active": 2.4e9},
    "qwen2.5-72b": {"params_total": 72.7e9, "kv_cache_bytes_per_token": 327680,
                    "train_flops_per_token": 394e9},
    "llama-3.1-405b": {"params_total": 405e9, "kv_cache_bytes_per_token": 516096,
                       "train_flops_per_token": 2448e9},
}
PUBLISHED_NOTES: dict[tuple[str, str], str] = {
    ("qwen2.5-72b", "train_flops_per_token"): (
        "The ISCA 2025 figure (394 GFLOPs/token for 'Qwen-72B') cannot come from Qwen2.5-72B's released "
        "config under any standard convention: even the smallest, 6 x non-embedding parameters with no "
        "attention and no output head, gives 6 x 70.2B = 421 GFLOPs (+7%); 6 x all 72.7B parameters "
        "gives 436 (+11%); ours (the convention that reproduces V2, V3 and Llama-3.1-405B within 1%) "
        "gives 445 (+13%). 394 corresponds to ~65.7B parameter-equivalents, so the published number used "
        "different architecture inputs, which the source does not state (an FFN width of 24,576 instead "
        "of 29,568 would give 386 under our convention, but that is a guess). Not adjusted."),
    ("deepseek-v3", "params_active"): (
        "'37B' is rounded to whole billions: 36.63B without the input embedding table (our "
        "params_active, -1.0%), 37.55B with it (+1.5%)."),
}


# ---------------------------------------------------------------------------------------- loading
def bundled_names() -> list[str]:
    """Names of the bundled model configurations (files in nanoseek/configs/, minus hardware.json)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json") if p != HARDWARE_FILE)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object (a config.json)")
    return data


def load_config(spec: str) -> tuple[str, dict[str, Any]]:
    """(display name, HF-style config dict) for a bundled name, a preset name, or a path to a
    config.json (or a directory holding one, e.g. a nanoseek run or checkpoint directory)."""
    from nanoseek.config import PRESETS, preset

    if spec in bundled_names():
        return spec, _read_json(CONFIG_DIR / f"{spec}.json")
    if spec in PRESETS:
        return spec, preset(spec).to_dict()
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return str(spec), _read_json(path)
    raise UserError(f"unknown model {spec!r}: not a bundled model ({', '.join(bundled_names())}), "
                    f"not a preset ({', '.join(PRESETS)}), and no config.json at {path}")


def _as_dict(cfg: Any) -> dict[str, Any]:
    """Accept a nanoseek ModelConfig, a raw HF dict, or a name/path understood by `load_config`."""
    if isinstance(cfg, dict):
        return cfg
    if isinstance(cfg, (str, Path)):
        return load_config(str(cfg))[1]
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise TypeError(f"expected a ModelConfig, a config dict or a model name, got {type(cfg).__name__}")


# ---------------------------------------------------------------------------------- architecture
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
    c = dict(_as_dict(cfg))
    c["model_type"] = _model_type(c)
    n, d, h = _get(c, "num_hidden_layers"), _get(c, "hidden_size"), _get(c, "num_attention_heads")
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


# --------------------------------------------------------------------------------------- metrics
def params(cfg: Any) -> dict[str, int]:
    """Parameter counts (see the module docstring for what each one includes)."""
    a = arch(cfg)
    final_norm = a.hidden_size
    head = 0 if a.tied else a.head_matmul
    total = a.embedding + head + final_norm + sum(p.total for p in a.layers)
    active = a.head_matmul + final_norm + sum(p.active for p in a.layers)  # no embedding lookup
    return {
        "params_total": total,
        "params_active": active,
        "params_total_no_embed": total - a.embedding - head,
        "params_active_no_embed": active - a.head_matmul,
        "params_active_with_embed": active + (0 if a.tied else a.embedding),
        "params_embedding": a.embedding,
        "params_head": head,
        "params_mtp_total": sum(p.total for p in a.mtp),
        "params_mtp_active": sum(p.active for p in a.mtp),
        "mtp_modules": len(a.mtp),
    }


def attention_flops_per_token(cfg: Any, seq_len: int, *, causal: bool = True, include_mtp: bool = False) -> float:
    """Forward FLOPs of the attention core (q.k and p.v), summed over layers, per token."""
    a = arch(cfg)
    ctx = seq_len / 2 if causal else seq_len
    n_layers = len(a.layers) + (len(a.mtp) if include_mtp else 0)
    return 2 * a.num_heads * (a.qk_head_dim + a.v_head_dim) * ctx * n_layers


def forward_flops_per_token(cfg: Any, seq_len: int, *, causal: bool = True, include_mtp: bool = False) -> float:
    """Forward FLOPs per token: 2 x matmul weights the token uses (output head included) + attention core."""
    a = arch(cfg)
    blocks = a.layers + (a.mtp if include_mtp else ())
    heads = 1 + (len(a.mtp) if include_mtp else 0)  # each MTP module runs the shared head again
    matmul = sum(p.matmul for p in blocks) + heads * a.head_matmul
    return 2 * matmul + attention_flops_per_token(cfg, seq_len, causal=causal, include_mtp=include_mtp)


def train_flops_per_token(cfg: Any, seq_len: int, *, causal: bool = True, include_mtp: bool = False) -> float:
    """Training FLOPs per token = 3 x forward (backward computes input and weight gradients)."""
    return 3 * forward_flops_per_token(cfg, seq_len, causal=causal, include_mtp=include_mtp)


def dtype_bytes(dtype: str | float) -> float:
    if isinstance(dtype, (int, float)):
        return float(dtype)
    if dtype.lower() not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype.lower()]


def kv_cache_bytes_per_token(cfg: Any, dtype: str | float = "bf16") -> int | float:
    """KV-cache bytes per token over the main model's layers (MTP layers excluded)."""
    a = arch(cfg)
    total = a.kv_cache_per_layer * len(a.layers) * dtype_bytes(dtype)
    return int(total) if total == int(total) else total


def memory_bytes(cfg: Any, *, weight_dtype: str | float = "bf16", master_bytes: float = 4,
                 moment_bytes: float = 4, grad_bytes: float = 2) -> dict[str, float]:
    """Weights alone, and the full training state: weights + fp32 master + 2 AdamW moments + grads."""
    p = params(cfg)
    n = p["params_total"] + p["params_mtp_total"]
    weights = n * dtype_bytes(weight_dtype)
    optimizer = n * (master_bytes + 2 * moment_bytes)
    grads = n * grad_bytes
    return {"weight_bytes": weights, "optimizer_bytes": optimizer, "grad_bytes": grads,
            "training_state_bytes": weights + optimizer + grads}


# ------------------------------------------------------------------------------ hardware and money
def load_hardware() -> dict[str, dict[str, Any]]:
    return {k: v for k, v in _read_json(HARDWARE_FILE).items() if not k.startswith("_")}


def _gpu(gpu: str) -> dict[str, Any]:
    hw = load_hardware()
    match = {k.lower(): k for k in hw}.get(gpu.lower())
    if match is None:
        raise UserError(f"unknown GPU {gpu!r}; choose one of: {', '.join(hw)}")
    return hw[match]


def peak_flops(gpu: str, precision: str = "bf16", comm_sms: int = 0) -> float:
    """Dense peak FLOP/s of one GPU, scaled by the share of SMs left for compute."""
    spec = _gpu(gpu)
    tflops = spec.get(f"{precision.lower()}_tflops")
    if tflops is None:
        raise UserError(f"{gpu} has no {precision} tensor-core peak in hardware.json")
    if not 0 <= comm_sms < spec["sms"]:
        raise UserError(f"comm_sms must be in [0, {spec['sms']}) for {gpu}")
    return tflops * 1e12 * (spec["sms"] - comm_sms) / spec["sms"]


def usd_per_gpu_hour(gpu: str) -> float | None:
    return _gpu(gpu).get("usd_per_gpu_hour")


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float, n_gpus: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of `n_gpus` GPUs."""
    return tokens_per_s * flops_per_token / (peak_flops * n_gpus)


def mfu_from_gpu_hours(tokens: float, flops_per_token: float, gpu_hours: float, peak_flops: float) -> float:
    """MFU of a finished run: total model FLOPs over what the GPU-hours could have delivered at peak."""
    return tokens * flops_per_token / (gpu_hours * 3600 * peak_flops)


def gpu_hours(tokens: float, flops_per_token: float, peak_flops: float, mfu: float) -> float:
    """GPU-hours to process `tokens` at a given MFU."""
    return tokens * flops_per_token / (peak_flops * mfu) / 3600


def dollars(gpu_hours: float, usd_per_gpu_hour: float) -> float:
    return gpu_hours * usd_per_gpu_hour


# ------------------------------------------------------------------------------- measured FLOPs
def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """`torch._grouped_mm` (MoE experts) is not in torch's FLOP registry, so it would count 0.
    2D x 2D groups split the shared K dimension (out is [G, M, N]); every other layout contracts all
    of A's last dimension into each output element."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU flash-attention kernel is not registered either. Like torch's own SDPA formulas this
    counts the full T x T products whether or not the call is causal."""
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def measured_forward_flops(model: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs torch's FlopCounterMode counts for one forward call `model(*args, **kwargs)`.
    It counts matmul-type ops only (mm, addmm, bmm, baddbmm, SDPA kernels) plus the two ops we register:
    `_grouped_mm` and the CPU flash SDPA kernel. SDPA is counted over the full T x T even when causal."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._grouped_mm: _grouped_mm_flops}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------- report
def summarize(cfg: Any, name: str | None = None, *, seq_len: int = 4096, kv_dtype: str = "bf16",
              include_mtp: bool = False, weight_dtype: str = "bf16", master_bytes: float = 4,
              moment_bytes: float = 4, grad_bytes: float = 2, tokens: float | None = None,
              peak: float | None = None, target_mfu: float = 0.4, usd: float | None = None,
              tokens_per_s: float | None = None, n_gpus: int = 1) -> dict[str, Any]:
    """Every metric for one model as plain numbers (the `--json` object)."""
    a = arch(cfg)
    train = train_flops_per_token(cfg, seq_len, include_mtp=include_mtp)
    row: dict[str, Any] = {
        "name": name or a.model_type, "model_type": a.model_type, "attention": a.attention,
        "layers": len(a.layers), "hidden_size": a.hidden_size, "heads": a.num_heads,
        "kv_heads": a.num_kv_heads, "qk_head_dim": a.qk_head_dim, "ffn": a.ffn_desc, **params(cfg),
        "kv_cache_dtype": kv_dtype, "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, kv_dtype),
        "seq_len": seq_len, "include_mtp": include_mtp,
        "forward_flops_per_token": forward_flops_per_token(cfg, seq_len, include_mtp=include_mtp),
        "train_flops_per_token": train,
        **memory_bytes(cfg, weight_dtype=weight_dtype, master_bytes=master_bytes,
                       moment_bytes=moment_bytes, grad_bytes=grad_bytes),
    }
    if tokens is not None and peak is not None:
        row.update(tokens=tokens, mfu_assumed=target_mfu, peak_flops=peak,
                   gpu_hours=gpu_hours(tokens, train, peak, target_mfu))
        row["usd"] = dollars(row["gpu_hours"], usd) if usd is not None else None
    if tokens_per_s is not None and peak is not None:
        row.update(tokens_per_s=tokens_per_s, n_gpus=n_gpus, peak_flops=peak,
                   mfu=mfu(tokens_per_s, train, peak, n_gpus))
    if name in PUBLISHED:
        row["published"] = PUBLISHED[name]
        row["notes"] = published_notes(name, row)
    return row


def published_notes(name: str, row: dict[str, Any]) -> list[str]:
    """One line per published figure: ours vs theirs, and the stated reason where they differ > 3%."""
    notes = []
    for key, theirs in PUBLISHED.get(name, {}).items():
        if key == "train_flops_per_token" and (row["seq_len"] != 4096 or row["include_mtp"]):
            continue  # published at seq 4096 without MTP; other settings are not comparable
        if key == "kv_cache_bytes_per_token" and dtype_bytes(row["kv_cache_dtype"]) != 2:
            continue  # published for BF16
        dev = row[key] / theirs - 1
        line = f"{name} {key}: ours {_fmt(key, row[key])} vs published {_fmt(key, theirs)} ({dev:+.1%})"
        reason = PUBLISHED_NOTES.get((name, key))
        if abs(dev) > 0.03 or reason:
            line += f" - {reason or 'no reason recorded'}"
        notes.append(line)
    return notes


def _human(x: float) -> str:
    """3-4 significant digits with a K/M/B/T suffix (counts of parameters or tokens)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.4g}"


def _flops(x: float) -> str:
    return f"{x / 1e9:,.1f} G" if x >= 1e9 else f"{x / 1e6:,.2f} M"


def _bytes(x: float) -> str:
    for scale, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB")):
        if x >= scale:
            return f"{x / scale:.3g} {suffix}"
    return f"{x:,.0f} B"


def _fmt(key: str, x: float) -> str:
    if key.startswith("kv_cache"):
        return f"{x:,.0f} B"
    return _flops(x) + "FLOPs" if "flops" in key else _human(x)


def _pair(r: dict[str, Any], a: str, b: str) -> str:
    return f"{_human(r[a])} / {_human(r[b])}"


def table_rows(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(label, one cell per model), in the order of the published comparison tables."""
    def attn(r):
        return (f"MLA, {r['heads']} heads" if r["attention"] == "MLA"
                else f"GQA {r['heads']} q / {r['kv_heads']} kv, d {r['qk_head_dim']}")

    def mtp(r):
        return f"{_human(r['params_mtp_total'])} ({r['mtp_modules']} module)" if r["mtp_modules"] else "-"

    spec = [
        ("layers / hidden", lambda r: f"{r['layers']} / {r['hidden_size']}"),
        ("attention", attn),
        ("FFN", lambda r: r["ffn"]),
        ("params total / active", lambda r: _pair(r, "params_total", "params_active")),
        ("  no embedding, no head", lambda r: _pair(r, "params_total_no_embed", "params_active_no_embed")),
        ("  active + embedding", lambda r: _human(r["params_active_with_embed"])),
        ("MTP params (not in totals)", mtp),
        ("KV cache per token", lambda r: f"{r['kv_cache_bytes_per_token']:,.0f} B"),
        ("forward FLOPs per token", lambda r: _flops(r["forward_flops_per_token"])),
        ("training FLOPs per token", lambda r: _flops(r["train_flops_per_token"])),
        ("weights", lambda r: _bytes(r["weight_bytes"])),
        ("training state", lambda r: _bytes(r["training_state_bytes"])),
    ]
    r0 = rows[0]
    if "gpu_hours" in r0:
        spec += [(f"GPU-hours, {_human(r0['tokens'])} tokens @ {r0['mfu_assumed']:.0%} MFU",
                  lambda r: f"{r['gpu_hours'] / 1e3:,.0f}K"),
                 ("cost (USD)", lambda r: "-" if r["usd"] is None else f"${r['usd'] / 1e6:,.3f}M")]
    if "mfu" in r0:
        spec.append((f"MFU @ {_human(r0['tokens_per_s'])} tokens/s, {r0['n_gpus']} GPU(s)",
                     lambda r: f"{r['mfu']:.1%}"))
    return [(label, [fn(r) for r in rows]) for label, fn in spec]


def table_title(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    r0 = rows[0]
    return (f"seq {r0['seq_len']}{' + MTP' if r0['include_mtp'] else ''}, KV cache {r0['kv_cache_dtype']}, "
            f"{args.weight_dtype} weights; training state = weights + master {args.master_bytes:g} B + "
            f"2 moments x {args.moment_bytes:g} B + grads {args.grad_bytes:g} B per param; "
            f"peak {args.gpu} {args.precision}")


def render_markdown(headers: list[str], body: list[tuple[str, list[str]]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in body]
    return "\n".join(lines)


def _print_rich(title: str, headers: list[str], body: list[tuple[str, list[str]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: don't squeeze the table into 80 columns
        console = Console(width=160)
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for label, cells in body:
        table.add_row(label, *cells)
    console.print(table)


# ------------------------------------------------------------------------------------------- CLI
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_number(text: str) -> float:
    """'14.8T', '2664K', '1.5e12', '2,664,000' -> float."""
    m = re.fullmatch(r"\s*([0-9][0-9_,]*\.?[0-9]*(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*", str(text), re.I)
    if not m:
        raise UserError(f"not a number: {text!r} (examples: 14.8T, 2664K, 1.5e12)")
    return float(m.group(1).replace(",", "").replace("_", "")) * _SUFFIX.get(m.group(2).lower(), 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="bundled name, preset name, or path to a config.json / model directory")
    p.add_argument("--compare", nargs="+", default=[], metavar="MODEL", help="more models, side by side")
    p.add_argument("--list", action="store_true", help="list bundled models, presets and GPUs")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for attention FLOPs (4096)")
    p.add_argument("--include-mtp", action="store_true", help="count MTP modules in the FLOPs")
    p.add_argument("--kv-dtype", default="bf16", help="KV-cache dtype (bf16)")
    p.add_argument("--weight-dtype", default="bf16", help="dtype of the working weights (bf16)")
    p.add_argument("--master-bytes", type=float, default=4, help="master-weight bytes per param (4)")
    p.add_argument("--moment-bytes", type=float, default=4, help="bytes per AdamW moment per param (4)")
    p.add_argument("--grad-bytes", type=float, default=2, help="gradient bytes per param (2)")
    p.add_argument("--gpu", default="H800", help="GPU in hardware.json (H800)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp8"], help="peak used for MFU (bf16)")
    p.add_argument("--comm-sms", type=int, default=0, help="SMs reserved for communication (V3: 20)")
    p.add_argument("--tokens", help="token budget, e.g. 14.8T: adds GPU-hours and dollars")
    p.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for --tokens (0.4)")
    p.add_argument("--usd-per-gpu-hour", type=float, help="price (default: hardware.json's for --gpu)")
    p.add_argument("--tokens-per-s", help="measured training throughput: adds MFU")
    p.add_argument("--n-gpus", type=int, default=1, help="GPUs behind --tokens-per-s (1)")
    p.add_argument("--stage", action="append", default=[], metavar="NAME=GPU_HOURS",
                   help="cost of training stages (repeatable; no models), e.g. pretraining=2664K")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table")
    fmt.add_argument("--json", action="store_true", help="print JSON: a list with one object per model")


def _stage_rows(stages: list[str], usd: float) -> list[dict[str, Any]]:
    rows = []
    for s in stages:
        name, sep, hours = s.partition("=")
        if not sep or not name:
            raise UserError(f"--stage wants NAME=GPU_HOURS, got {s!r}")
        rows.append({"stage": name, "gpu_hours": parse_number(hours)})
    rows.append({"stage": "total", "gpu_hours": sum(r["gpu_hours"] for r in rows)})
    for r in rows:
        r["usd"] = dollars(r["gpu_hours"], usd)
    return rows


def _emit(args: argparse.Namespace, title: str, headers: list[str], body: list[tuple[str, list[str]]]) -> None:
    if args.markdown:
        print(f"{title}\n\n{render_markdown(headers, body)}")
    else:
        _print_rich(title, headers, body)


def _list() -> None:
    from nanoseek.config import PRESETS
    print("bundled models:", ", ".join(bundled_names()))
    print("presets:       ", ", ".join(PRESETS))
    print("GPUs:          ", ", ".join(load_hardware()))


def run(args: argparse.Namespace) -> int:
    if args.list:
        _list()
        return 0
    specs = args.models + args.compare
    usd = args.usd_per_gpu_hour if args.usd_per_gpu_hour is not None else usd_per_gpu_hour(args.gpu)
    if args.stage:
        if specs:
            raise UserError("--stage prices GPU-hours directly; run it without models")
        if usd is None:
            raise UserError(f"no price for {args.gpu} in hardware.json; pass --usd-per-gpu-hour")
        rows = _stage_rows(args.stage, usd)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        body = [(r["stage"], [f"{r['gpu_hours'] / 1e3:,.0f}K", f"${r['usd'] / 1e6:,.3f}M"]) for r in rows]
        _emit(args, f"training cost at ${usd:g}/GPU-hour", ["stage", f"{args.gpu} GPU-hours", "cost (USD)"], body)
        return 0
    if not specs:
        raise UserError("name at least one model (try `nanoseek cost --list`)")
    if args.seq_len < 1:
        raise UserError("--seq-len must be >= 1")
    peak = peak_flops(args.gpu, args.precision, args.comm_sms)
    rows = [summarize(cfg, name, seq_len=args.seq_len, kv_dtype=args.kv_dtype, include_mtp=args.include_mtp,
                      weight_dtype=args.weight_dtype, master_bytes=args.master_bytes,
                      moment_bytes=args.moment_bytes, grad_bytes=args.grad_bytes,
                      tokens=parse_number(args.tokens) if args.tokens else None, peak=peak,
                      target_mfu=args.mfu, usd=usd,
                      tokens_per_s=parse_number(args.tokens_per_s) if args.tokens_per_s else None,
                      n_gpus=args.n_gpus)
            for name, cfg in map(load_config, specs)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _emit(args, table_title(rows, args), ["", *[r["name"] for r in rows]], table_rows(rows))
    notes = [n for r in rows for n in r.get("notes", [])]
    if notes:
        print("\nvs published:" if not args.markdown else "\nvs published:\n")
        for n in notes:
            print(f"- {n}")
    return 0
