"""The accounting formulas: parameters, FLOPs per token, KV cache, memory, GPU-hours, dollars, MFU.
Conventions: see the `nanoseek.cost` package docstring (every number follows them)."""

from __future__ import annotations

from typing import Any

from nanoseek.cost.arch import arch
from nanoseek.errors import UserError

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
               "fp8": 1, "float8": 1, "int8": 1, "int4": 0.5}


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
