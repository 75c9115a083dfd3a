"""`nanoseek cost`: parameters, FLOPs, KV cache, memory, GPU-hours, dollars and MFU of one or more
models, side by side (rich table, Markdown or JSON), or the price of training stages."""

from __future__ import annotations

import argparse
import json
import math
import re
from typing import Any

from nanoseek.config import PRESETS
from nanoseek.cost.accounting import DTYPE_BYTES, dollars
from nanoseek.cost.hardware import load_hardware, peak_flops, usd_per_gpu_hour
from nanoseek.cost.models import bundled_names, load_config
from nanoseek.cost.summary import summarize
from nanoseek.cost.tables import print_rich, render_markdown, table_rows, table_title
from nanoseek.errors import UserError, is_finite_number, require

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_quantity(text: str, setting: str = "value") -> float:
    """A count written with an optional K/M/B/G/T suffix: '14.8T', '2664K', '1.5e12', '2,664,000'
    -> float. `setting` names the flag in the error message."""
    m = re.fullmatch(r"\s*([0-9][0-9_,]*\.?[0-9]*(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*", str(text), re.I)
    if not m:
        raise UserError(f"invalid setting `{setting}` = {text!r}: must be a number such as 14.8T, "
                        "2664K or 1.5e12")
    return float(m.group(1).replace(",", "").replace("_", "")) * _SUFFIX.get(m.group(2).lower(), 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="bundled name, preset name, or path to a config.json / model directory "
                        "(Hugging Face or DeepSeek inference format)")
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
    p.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for --tokens, in (0, 1] (0.4)")
    p.add_argument("--usd-per-gpu-hour", type=float, help="price (default: hardware.json's for --gpu)")
    p.add_argument("--tokens-per-s", help="measured training throughput: adds MFU")
    p.add_argument("--n-gpus", type=int, default=1, help="GPUs behind --tokens-per-s (1)")
    p.add_argument("--stage", action="append", default=[], metavar="NAME=GPU_HOURS",
                   help="cost of training stages (repeatable; no models), e.g. pretraining=2664K")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print a Markdown table")
    fmt.add_argument("--json", action="store_true", help="print JSON: a list with one object per model")


def check_settings(args: argparse.Namespace) -> dict[str, float | None]:
    """Every flag checked before any model is read; returns the parsed quantities."""
    require(args.seq_len >= 1, "--seq-len", args.seq_len, "a positive integer")
    require(is_finite_number(args.mfu) and 0 < args.mfu <= 1, "--mfu", args.mfu, "in (0, 1]")
    require(args.n_gpus >= 1, "--n-gpus", args.n_gpus, "a positive integer")
    require(args.comm_sms >= 0, "--comm-sms", args.comm_sms, "a non-negative integer")
    for flag in ("master_bytes", "moment_bytes", "grad_bytes"):
        value = getattr(args, flag)
        require(is_finite_number(value) and value >= 0, "--" + flag.replace("_", "-"), value,
                "a finite number >= 0")
    if args.usd_per_gpu_hour is not None:
        require(is_finite_number(args.usd_per_gpu_hour) and args.usd_per_gpu_hour >= 0,
                "--usd-per-gpu-hour", args.usd_per_gpu_hour, "a finite number >= 0")
    for flag in ("kv_dtype", "weight_dtype"):
        value = getattr(args, flag)
        require(value.lower() in DTYPE_BYTES, "--" + flag.replace("_", "-"), value,
                "one of " + ", ".join(DTYPE_BYTES))
    quantities: dict[str, float | None] = {}
    for flag in ("tokens", "tokens_per_s"):
        text = getattr(args, flag)
        name = "--" + flag.replace("_", "-")
        value = None if text is None else parse_quantity(text, name)
        if value is not None:
            require(math.isfinite(value) and value > 0, name, text, "a positive number")
        quantities[flag] = value
    return quantities


def _stage_rows(stages: list[str], usd: float) -> list[dict[str, Any]]:
    rows = []
    for s in stages:
        name, sep, hours = s.partition("=")
        if not sep or not name:
            raise UserError(f"invalid setting `--stage` = {s!r}: must be NAME=GPU_HOURS")
        rows.append({"stage": name, "gpu_hours": parse_quantity(hours, f"--stage {name}")})
    rows.append({"stage": "total", "gpu_hours": sum(r["gpu_hours"] for r in rows)})
    for r in rows:
        r["usd"] = dollars(r["gpu_hours"], usd)
    return rows


def _emit(args: argparse.Namespace, title: str, headers: list[str], body: list[tuple[str, list[str]]]) -> None:
    if args.markdown:
        print(f"{title}\n\n{render_markdown(headers, body)}")
    else:
        print_rich(title, headers, body)


def _list() -> None:
    print("bundled models:", ", ".join(bundled_names()))
    print("presets:       ", ", ".join(PRESETS))
    print("GPUs:          ", ", ".join(load_hardware()))


def run(args: argparse.Namespace) -> int:
    if args.list:
        _list()
        return 0
    quantities = check_settings(args)
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
    peak = peak_flops(args.gpu, args.precision, args.comm_sms)
    configs = [load_config(spec) for spec in specs]  # every model read (and checked) before any output
    rows = [summarize(cfg, name, seq_len=args.seq_len, kv_dtype=args.kv_dtype, include_mtp=args.include_mtp,
                      weight_dtype=args.weight_dtype, master_bytes=args.master_bytes,
                      moment_bytes=args.moment_bytes, grad_bytes=args.grad_bytes,
                      tokens=quantities["tokens"], peak=peak, target_mfu=args.mfu, usd=usd,
                      tokens_per_s=quantities["tokens_per_s"], n_gpus=args.n_gpus)
            for name, cfg in configs]
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
