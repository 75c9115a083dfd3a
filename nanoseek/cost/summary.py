"""`summarize`: every metric of one model as plain numbers (one row of the table, one object of
`nanoseek cost --json`), with the published figures it can be compared to."""

from __future__ import annotations

from typing import Any

from nanoseek.cost.accounting import (
    dollars, dtype_bytes, forward_flops_per_token, gpu_hours, kv_cache_bytes_per_token, memory_bytes,
    mfu, params, train_flops_per_token,
)
from nanoseek.cost.arch import arch
from nanoseek.cost.published import PUBLISHED, PUBLISHED_NOTES
from nanoseek.cost.tables import format_metric


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
        line = (f"{name} {key}: ours {format_metric(key, row[key])} vs published "
                f"{format_metric(key, theirs)} ({dev:+.1%})")
        reason = PUBLISHED_NOTES.get((name, key))
        if abs(dev) > 0.03 or reason:
            line += f" - {reason or 'no reason recorded'}"
        notes.append(line)
    return notes
