"""MoE overlap on vs off under expert parallelism: step time, all-to-all time and how much of it is hidden.

    python benchmarks/moe_overlap.py                       # EP=2 on 2 CPU processes (gloo), ~1 minute
    python benchmarks/moe_overlap.py --steps 20 --hidden 256

Two processes (launched like torchrun) train one model with `parallel.ep=2`; the steps cycle through three
modes, so all see the same machine load:
  off    the plain EP path (one all-to-all per dispatch and combine, each waited for at once);
  split  the overlap module's two halves with every exchange waited for as soon as it starts (the same
         operations as `on`, nothing overlapped: what splitting a micro-batch costs by itself);
  on     `parallel.overlap=true` (nanoseek.parallel.overlap).
Every `all_to_all_single` is timed from the outside (the benchmark wraps it):
  rows in flight  issue -> completion of the dispatch/combine row exchanges, forward and backward (a
                  synchronous call: its duration; an asynchronous one: until its future completes or a
                  wait() returns, whichever is seen first);
  rows exposed    the time this process was blocked on them (a synchronous call: all of it; an
                  asynchronous one: the time spent issuing it, shown apart as "issuing", and in `wait()`);
  counts          the small per-expert count exchanges that size the row exchanges (synchronous in both).
  other       step - rows exposed - counts: computation, Python, and everything else this process did.
Hidden share = 1 - exposed / in flight, per step; medians over steps; the step of a rank pair is its slower rank.
A benchmark, not a test: numbers depend on the machine (see docs/distributed.md, "Overlap in the MoE layer").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("off", "split", "on")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


class TimedWork:
    """An async collective's work handle: when it was issued, when it completed, how long wait() blocked."""

    def __init__(self, work, timer: "CollectiveTimer", kind: str, issued: float):
        self.work, self.timer, self.kind, self.issued = work, timer, kind, issued
        self.completed = float("inf")
        work.get_future().add_done_callback(self.done)

    def done(self, _future) -> None:  # runs on the collective's thread, which a loaded machine may run late
        self.completed = min(self.completed, time.perf_counter())

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.work.wait(*args, **kwargs)
        t1 = time.perf_counter()
        self.timer.totals[f"{self.kind}_exposed"] += t1 - t0
        self.completed = min(self.completed, t1)  # it was complete when wait returned, at the latest
        return out


class CollectiveTimer:
    """Wraps torch.distributed.all_to_all_single: in-flight and blocked time per kind (rows / counts)."""

    def __init__(self):
        import torch.distributed as dist

        self.totals: dict[str, float] = defaultdict(float)
        self.pending: list[TimedWork] = []
        self.original = dist.all_to_all_single
        dist.all_to_all_single = self.all_to_all_single

    def all_to_all_single(self, output, input, *args, async_op: bool = False, **kwargs):
        kind = "rows" if input.dim() > 1 else "counts"
        t0 = time.perf_counter()
        work = self.original(output, input, *args, async_op=async_op, **kwargs)
        spent = time.perf_counter() - t0
        self.totals[f"{kind}_calls"] += 1
        self.totals[f"{kind}_exposed"] += spent  # an async call blocks this thread while it is issued
        if not async_op:
            self.totals[f"{kind}_in_flight"] += spent
            return work
        self.totals[f"{kind}_issue"] += spent
        timed = TimedWork(work, self, kind, t0)
        self.pending.append(timed)
        return timed

    def take(self) -> dict[str, float]:
        """Totals since the last call (every async exchange must have been waited for)."""
        for w in self.pending:
            self.totals[f"{w.kind}_in_flight"] += w.completed - w.issued
        out, self.totals, self.pending = dict(self.totals), defaultdict(float), []
        return out


def model_config(args):
    from nanoseek.config import preset

    return preset(args.preset).replace(vocab_size=512, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
                                       hidden_size=args.hidden, n_group=2, topk_group=args.topk_group)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.parallel.config import ParallelConfig
    from nanoseek.parallel.runtime import ParallelRuntime

    torch.set_num_threads(args.threads)
    cfg = ParallelConfig(ep=2, overlap=True)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(model_config(args))
    cfg.validate(model.config)
    runtime = ParallelRuntime.for_run(cfg, torch.device("cpu"))
    runtime.parallelize(model)
    from nanoseek.parallel.overlap import OverlappedMoEBlock

    blocks = [m for m in model.modules() if getattr(m, "overlapped_forward", None) is not None]
    hooks = {"off": [None] * len(blocks), "split": [OverlappedMoEBlock(wait_at_once=True) for _ in blocks],
             "on": [b.overlapped_forward for b in blocks]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 512, (args.batch, args.seq_len), generator=g)
    mine = batch.chunk(runtime.dp_size)[runtime.dp_rank]
    timer = CollectiveTimer()
    rows = {mode: [] for mode in MODES}
    for step in range(len(MODES) * (args.warmup + args.steps)):
        mode = MODES[step % len(MODES)]
        for block, hook in zip(blocks, hooks[mode]):
            block.overlapped_forward = hook
        dist.barrier()
        timer.take()
        t0 = time.perf_counter()
        loss = model(mine, labels=mine).loss
        loss.backward()
        runtime.finish_gradients(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - t0
        dist.barrier()  # every async exchange has completed: its in-flight time is recorded
        t = timer.take()
        if step >= len(MODES) * args.warmup:
            rows[mode].append({"step": step_s, **{k: t.get(k, 0.0) for k in
                               ("rows_in_flight", "rows_exposed", "rows_issue", "counts_in_flight", "rows_calls", "counts_calls")}})
    result = {}
    for mode, steps in rows.items():
        med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        med["hidden_share"] = statistics.median(1 - s["rows_exposed"] / s["rows_in_flight"] for s in steps)
        med["compute"] = statistics.median(s["step"] - s["rows_exposed"] - s["counts_in_flight"] for s in steps)
        result[mode] = med
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if runtime.is_main:
        Path(args.out).write_text(json.dumps({"ranks": gathered, "blocks": len(blocks)}))
    runtime.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads may std::terminate while the interpreter tears the process group down


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--topk-group", type=int, default=2, help="expert groups (of 2) a token may use")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="measured steps per mode (they alternate)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from parallel_launch import launch

    out = Path(f"/tmp/nanoseek_bench_moe_overlap_{os.getpid()}.json")
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "out")]
    load = os.getloadavg()
    t0 = time.perf_counter()
    for rc, log in launch([__file__, *forwarded, "--worker", "--out", str(out)], 2, timeout=600):
        if rc != 0:
            raise SystemExit(f"a rank failed (rc {rc}):\n{log[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink(missing_ok=True)
    print(f"model: {args.preset}, hidden {args.hidden}, {args.experts} experts, top-{args.top_k}; global batch "
          f"{args.batch} x {args.seq_len}; EP=2 on 2 CPU processes (gloo), {args.threads} thread(s) each; "
          f"{result['blocks']} MoE blocks; median of {args.steps} steps per mode (alternating)")
    print(f"{'mode':<7}{'rank':>5}{'step ms':>9}{'rows in flight ms':>19}{'rows exposed ms':>17}{'(issuing)':>11}"
          f"{'hidden':>8}{'counts ms':>11}{'other ms':>10}{'exchanges':>11}")
    for mode in MODES:
        for rank, r in enumerate(result["ranks"]):
            m = r[mode]
            print(f"{mode:<7}{rank:>5}{1000 * m['step']:>9.1f}{1000 * m['rows_in_flight']:>19.1f}"
                  f"{1000 * m['rows_exposed']:>17.1f}{1000 * m['rows_issue']:>11.1f}{100 * m['hidden_share']:>7.0f}%{1000 * m['counts_in_flight']:>11.1f}"
                  f"{1000 * m['compute']:>10.1f}{m['rows_calls'] + m['counts_calls']:>11.0f}")
    step = {mode: max(r[mode]["step"] for r in result["ranks"]) for mode in MODES}
    exposed = {mode: statistics.mean(r[mode]["rows_exposed"] for r in result["ranks"]) for mode in MODES}
    print("step (slowest rank): " + ", ".join(f"{mode} {1000 * step[mode]:.1f} ms" for mode in MODES)
          + f"; on vs off {100 * (step['on'] / step['off'] - 1):+.1f}%, on vs split {100 * (step['on'] / step['split'] - 1):+.1f}%")
    print("exposed row all-to-all per step (mean over ranks): "
          + ", ".join(f"{mode} {1000 * exposed[mode]:.1f} ms" for mode in MODES))
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f"; wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
