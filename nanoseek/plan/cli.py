"""`nanoseek plan`: memory, step time and cost of a training layout on a cluster (or `--sweep` of all
layouts, `--serve` for the serving view, `--v3` for the DeepSeek-V3 run and its what-ifs,
`--calibrate` to measure this machine and check the planner against a real training step)."""

from __future__ import annotations

import argparse
import json
import math

from nanoseek.cost.cli import parse_quantity
from nanoseek.cost.models import load_config
from nanoseek.errors import UserError, require
from nanoseek.plan.blocks import ACTIVATION_PROFILES, RECOMPUTE
from nanoseek.plan.calibrate import calibrate, calibration_text
from nanoseek.plan.validate import validate, validation_text
from nanoseek.plan.cluster import cluster
from nanoseek.plan.layout import SCHEDULES, Layout
from nanoseek.plan.precision import RECIPES
from nanoseek.plan.report import serving_text, sweep_text, training_text
from nanoseek.plan.serving import SERVE_DTYPES, plan_serving
from nanoseek.plan.sweep import sweep
from nanoseek.plan.training import BW_EFFICIENCY, GEMM_EFFICIENCY, RESERVE_GB, plan_training
from nanoseek.plan.v3 import v3_plans, v3_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="bundled name, preset, run directory or config.json (HF or DeepSeek inference format); "
                        "several only with --serve")
    c = p.add_argument_group("cluster (defaults from nanoseek/configs/hardware.json)")
    c.add_argument("--gpu", default="H800", help="GPU type (H800)")
    c.add_argument("--gpus", type=int, default=8, help="number of GPUs (8)")
    c.add_argument("--gpus-per-node", type=int)
    c.add_argument("--bf16-tflops", type=float, help="dense BF16 peak per GPU")
    c.add_argument("--fp8-tflops", type=float, help="dense FP8 peak per GPU")
    c.add_argument("--hbm-gb", type=float, help="HBM per GPU as datasheets write it (binary: 80 = 80 GiB)")
    c.add_argument("--hbm-tb-s", type=float, help="memory bandwidth per GPU")
    c.add_argument("--nvlink-gb-s", type=float, help="intra-node bandwidth per GPU per direction")
    c.add_argument("--internode-gb-s", type=float, help="network bandwidth per GPU per direction")
    c.add_argument("--usd-per-gpu-hour", type=float)
    c.add_argument("--comm-sms", type=int, default=0, help="SMs kept for communication (V3: 20)")
    lo = p.add_argument_group("parallel layout")
    lo.add_argument("--pp", type=int, default=1)
    lo.add_argument("--ep", type=int, default=1)
    lo.add_argument("--dp-shard", type=int, help="mesh dim: GPUs = pp x dp_shard x ep (derived; if given, checked)")
    lo.add_argument("--zero", type=int, default=1, help="0, 1 (optimizer states), 2 (+ grads), 3 (FSDP) (1)")
    lo.add_argument("--schedule", default="1f1b", help="|".join(SCHEDULES) + " (1f1b)")
    lo.add_argument("--virtual-stages", type=int, default=2, help="chunks per device, interleaved_1f1b (2)")
    lo.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (1)")
    lo.add_argument("--global-batch", type=int, help="sequences per step (default: the fewest the schedule needs)")
    lo.add_argument("--seq-len", type=int, help="tokens per sequence (4096 or the model's context if shorter; "
                    "--calibrate: 256)")
    lo.add_argument("--precision", default="bf16", help="|".join(RECIPES) + " (bf16)")
    lo.add_argument("--recompute", default="none", help="|".join(RECOMPUTE) + " (none)")
    lo.add_argument("--activations", default="nanoseek", help="|".join(ACTIVATION_PROFILES) + " (nanoseek)")
    lo.add_argument("--attention", default="fused", help="attention kernel: fused|math (fused)")
    lo.add_argument("--split", default="balanced", help="layers per pipeline chunk: balanced (by forward time)|even "
                    "(balanced)")
    lo.add_argument("--node-limit", type=int, help="nodes a token may reach (default: the model's topk_group "
                    "when its groups map onto nodes; 0 = no limit)")
    lo.add_argument("--no-mtp", action="store_true", help="do not train the MTP modules")
    a = p.add_argument_group("assumptions")
    a.add_argument("--gemm-efficiency", type=float, default=GEMM_EFFICIENCY, help=f"({GEMM_EFFICIENCY})")
    a.add_argument("--bw-efficiency", type=float, default=BW_EFFICIENCY, help=f"({BW_EFFICIENCY})")
    a.add_argument("--overlap", type=float, default=0.0, help="all-to-all share hidden outside DualPipe (0)")
    a.add_argument("--reserve-gb", type=float, default=RESERVE_GB, help=f"({RESERVE_GB:g})")
    a.add_argument("--tokens", help="token budget, e.g. 14.8T: GPU-hours and dollars")
    m = p.add_argument_group("modes")
    m.add_argument("--sweep", action="store_true", help="all feasible layouts, fastest first")
    m.add_argument("--top", type=int, default=20, help="rows of --sweep (20)")
    m.add_argument("--serve", action="store_true", help="serving view: concurrent requests per GPU and node")
    m.add_argument("--context", type=int, default=32768, help="--serve: tokens per request (32768)")
    m.add_argument("--weight-dtype", default="fp8", help="--serve: bf16|fp8 (fp8)")
    m.add_argument("--kv-dtype", default="bf16", help="--serve: bf16|fp8 (bf16)")
    m.add_argument("--serve-gpus", type=int, help="--serve: GPUs per replica (default: the fewest that fit)")
    m.add_argument("--v3", action="store_true", help="the DeepSeek-V3 run and its what-ifs")
    m.add_argument("--calibrate", action="store_true", help="measure this machine and check the planner "
                   "against a real training step of MODEL (default: small)")
    m.add_argument("--validate", action="store_true", help="four --calibrate runs back to back (small 4x256, "
                   "bench 4x256, small 2x512, tiny 8x512): predicted vs measured step time and memory")
    m.add_argument("--batch", type=int, default=4, help="--calibrate: sequences per step (4)")
    m.add_argument("--steps", type=int, default=5, help="--calibrate/--validate: timed steps (5)")
    m.add_argument("--json", action="store_true", help="print JSON")


def _cluster(args: argparse.Namespace):
    return cluster(args.gpu, args.gpus, comm_sms=args.comm_sms, gpus_per_node=args.gpus_per_node,
                   bf16_tflops=args.bf16_tflops, fp8_tflops=args.fp8_tflops,
                   hbm_gb=args.hbm_gb, hbm_tb_s=args.hbm_tb_s, nvlink_gb_s=args.nvlink_gb_s,
                   internode_gb_s=args.internode_gb_s,
                   usd_per_gpu_hour=args.usd_per_gpu_hour)


def _layout(args: argparse.Namespace, cfg: dict) -> Layout:
    """The layout the flags describe; without --seq-len, 4096 or the model's context if shorter."""
    seq_len = args.seq_len
    if seq_len is None:
        seq_len = min(4096, cfg.get("max_position_embeddings") or 4096)
    return Layout(pp=args.pp, ep=args.ep, dp_shard=args.dp_shard, zero=args.zero, schedule=args.schedule,
                  virtual_stages=args.virtual_stages, micro_batch=args.micro_batch, global_batch=args.global_batch,
                  seq_len=seq_len, precision=args.precision,
                  recompute=args.recompute,
                  node_limit=args.node_limit, mtp=not args.no_mtp, activations=args.activations,
                  attention=args.attention, split=args.split)


def _tokens(args: argparse.Namespace) -> float | None:
    if args.tokens is None:
        return None
    value = parse_quantity(args.tokens, "--tokens")
    require(math.isfinite(value) and value > 0, "--tokens", args.tokens, "a positive number")
    return value


def _print(args: argparse.Namespace, data, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def run(args: argparse.Namespace) -> int:
    modes = [m for m in ("sweep", "serve", "v3", "calibrate", "validate") if getattr(args, m)]
    if len(modes) > 1:
        raise UserError(f"choose one of --{' / --'.join(modes)}")
    require(args.top >= 1, "--top", args.top, "a positive integer")
    kwargs = dict(gemm_efficiency=args.gemm_efficiency, bw_efficiency=args.bw_efficiency, overlap=args.overlap,
                  reserve_gb=args.reserve_gb)
    if args.v3:
        if args.models:
            raise UserError("--v3 plans DeepSeek-V3's own run; name no model")
        rows = v3_plans(**kwargs)
        _print(args, rows, v3_table(rows) + "\n\nassumptions (published setup):\n"
               + "\n".join(f"  - {a}" for a in rows[0]["assumptions"]))
        return 0
    if args.validate:
        if args.models:
            raise UserError("--validate runs its own four calibration runs; name no model")
        result = validate(steps=args.steps)
        _print(args, result, validation_text(result))
        return 0
    if args.calibrate:
        if len(args.models) > 1:
            raise UserError("--calibrate runs one model")
        result = calibrate(args.models[0] if args.models else "small",
                           seq_len=256 if args.seq_len is None else args.seq_len, batch=args.batch, steps=args.steps)
        _print(args, result, calibration_text(result))
        return 0
    if not args.models:
        raise UserError("name a model (a preset, bundled name, run directory or config.json)")
    configs = [load_config(m) for m in args.models]  # every model read and checked before any output
    cl = _cluster(args)
    if args.serve:
        require(args.weight_dtype in SERVE_DTYPES, "--weight-dtype", args.weight_dtype, "bf16 or fp8")
        rows = [plan_serving(cfg, cl, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype, context=args.context,
                             gpus=args.serve_gpus, reserve_gb=args.reserve_gb, name=name) for name, cfg in configs]
        _print(args, rows, serving_text(rows))
        return 0
    if len(configs) > 1:
        raise UserError("plan one model at a time (several only with --serve)")
    name, cfg = configs[0]
    tokens = _tokens(args)
    if args.sweep:
        result = sweep(cfg, cl, _layout(args, cfg), top=args.top, tokens=tokens, name=name, **kwargs)
        _print(args, result, sweep_text(result))
        return 0
    result = plan_training(cfg, cl, _layout(args, cfg), tokens=tokens, name=name, **kwargs)
    _print(args, result, training_text(result))
    return 0
