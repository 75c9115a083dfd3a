"""Rendering `summarize` rows: human-readable numbers, the comparison table (rich or Markdown)."""

from __future__ import annotations

import argparse
from typing import Any


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


def format_metric(key: str, x: float) -> str:
    """A published-comparison value: bytes, FLOPs or a count, by the metric's name."""
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


def print_rich(title: str, headers: list[str], body: list[tuple[str, list[str]]]) -> None:
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
