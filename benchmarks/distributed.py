"""Distributed training layouts on local processes: step time and EP all-to-all bytes per token.

    python benchmarks/distributed.py                  # CPU, gloo, every layout below
    python benchmarks/distributed.py --layouts 1 dp_shard=2 --steps 10 --device cuda

For each layout, N processes (launched like torchrun: RANK/WORLD_SIZE/MASTER_ADDR env) train the same
model on the same global batch; rank 0 reports the median step time (forward + backward + gradient
completion + AdamW) and the dispatch traffic of one step, per MoE layer call and per token, split into
self / intra-node / cross-node, against the formula tokens x top-k x hidden x bytes (combine sends the
same volume back; the backward repeats both). `nodes=2` simulates two machines on this one.
A benchmark, not a test: numbers depend on the machine (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

LAYOUTS = ["1", "dp_shard=2", "ep=2", "ep=2,nodes=2", "ep=4,nodes=2", "dp_shard=2,ep=2,nodes=2"]


def model_config(args):
    from nanoseek.config import preset

    return preset(args.preset).replace(vocab_size=512, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
                                       n_group=2, topk_group=1)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.parallel.config import ParallelConfig
    from nanoseek.parallel.runtime import ParallelRuntime

    torch.set_num_threads(args.threads)
    spec = args.worker
    cfg = ParallelConfig(**({k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))} if spec != "1" else {}))
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(model_config(args)).to(device)
    runtime = None
    if cfg.enabled:
        cfg.validate(model.config, device_type=device.type)
        runtime = ParallelRuntime.for_run(cfg, device)
        device = runtime.device
        runtime.parallelize(model)
    dp, dp_rank = (runtime.dp_size, runtime.dp_rank) if runtime else (1, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 512, (args.batch, args.seq_len), generator=g)
    mine = batch.chunk(dp)[dp_rank].to(device)
    times, traffic = [], {}
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(mine, labels=mine).loss
        loss.backward()
        if runtime:
            runtime.finish_gradients(model, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        if runtime and cfg.ep > 1:
            traffic = runtime.meter.take()  # the last step's
    if runtime:
        t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        times = t.tolist()
        keys = ["self_bytes", "intra_node_bytes", "cross_node_bytes", "cross_node_dedup_bytes", "tokens", "copies"]
        sums = torch.tensor([traffic.get(k, 0.0) for k in keys], dtype=torch.float64)
        dist.all_reduce(sums)
        traffic = dict(zip(keys, sums.tolist())) if cfg.ep > 1 else {}
    if runtime is None or runtime.is_main:
        mc = model.config
        row = {"layout": spec, "procs": cfg.world_size, "step_ms": 1000 * statistics.median(times),
               "tokens_per_s": args.batch * args.seq_len / statistics.median(times), **traffic,
               "formula_bytes_per_token": mc.num_experts_per_tok * mc.hidden_size * 4}
        Path(args.out).write_text(json.dumps(row))
    if runtime:
        runtime.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=LAYOUTS)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from parallel_launch import launch

    print(f"model: {args.preset} with {args.experts} experts, top-{args.top_k}; global batch {args.batch} x "
          f"{args.seq_len}; {args.threads} thread(s) per process; device {args.device}")
    header = (f"{'layout':<26}{'procs':>6}{'step ms':>9}{'tok/s':>8}{'B/tok':>8}{'formula':>8}{'self':>7}"
              f"{'intra':>7}{'cross':>7}{'x-dedup':>8}")
    print(header)
    out = Path(f"/tmp/nanoseek_bench_distributed_{os.getpid()}.json")
    for spec in args.layouts:
        procs = 1
        if spec != "1":
            values = dict(kv.split("=") for kv in spec.split(","))
            procs = int(values.get("dp_shard", 1)) * int(values.get("ep", 1)) * int(values.get("pp", 1))
        forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k not in ("layouts", "worker", "out")]
        cmd = [__file__, *forwarded, "--worker", spec, "--out", str(out)]
        for rc, log in launch(cmd, procs, timeout=600):
            if rc != 0:
                raise SystemExit(f"layout {spec} failed:\n{log[-3000:]}")
        row = json.loads(out.read_text())
        line = f"{spec:<26}{procs:>6}{row['step_ms']:>9.1f}{row['tokens_per_s']:>8.0f}"
        if "tokens" in row:
            per = lambda k: row[k] / row["tokens"]  # bytes per token per MoE layer call
            sent = per("self_bytes") + per("intra_node_bytes") + per("cross_node_bytes")
            line += (f"{sent:>8.0f}{row['formula_bytes_per_token']:>8}{per('self_bytes'):>7.0f}"
                     f"{per('intra_node_bytes'):>7.0f}{per('cross_node_bytes'):>7.0f}{per('cross_node_dedup_bytes'):>8.0f}")
        print(line, flush=True)
    out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
