"""Pipeline schedules on local processes: step time, measured bubble per pipeline rank against the formulas,
memory held per stage, and a timeline of one step per schedule.

    python benchmarks/pipeline.py                          # CPU, gloo, pp=2, every schedule (about 2 minutes)
    python benchmarks/pipeline.py --schedules 1f1b dualpipev --pp 2 --microbatches 8 --device cuda

For each schedule, `pp` processes (launched like torchrun) train the same model on the same batch; every rank
times each compute action of its stages (forward F, full backward B, input backward I, weight backward W:
nanoseek.parallel.pipeline_trace.StageTracker) and each wait on a point-to-point transfer, over the last timed step.
Idle time of a rank = the schedule's time (from the step's start, all ranks released by a barrier, to the end of
its schedule.step) - its compute time: waiting on transfers (the bubble, plus the transfers themselves) and
the schedule's own bookkeeping. Step time adds the gradient completion and AdamW. The formulas use F, B, W
measured in the same run, per stage (one model chunk's forward, full backward = I + W when split, weight
backward of one micro-batch):
  1F1B, interleaved 1F1B  (PP-1)(F+B)               PP = pipeline ranks (interleaved: F, B of one chunk)
  ZB1P (for zbv)          (PP-1)(F+B-2W)            (torch's ZBV is ZB-V: this is the nearest closed form)
  DualPipe (dualpipev)    (PP/2-1)(F&B+B-3W)        PP = stages = 2 x ranks (DualPipeV: PP stages on PP/2
                                                    ranks); F&B = F + B (no overlap of the two on CPU)
Writes docs/pipeline_timeline.png (one row per stage; compute coloured by kind, transfers waited on in red)
and, with --json, the raw numbers. A benchmark, not a test: numbers depend on the machine.
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

SCHEDULES = ["1f1b", "interleaved_1f1b", "zbv", "dualpipev"]
COLOURS = {"F": "#4c78a8", "B": "#f58518", "I": "#f58518", "W": "#54a24b", "wait": "#e45756"}


def model_config(args):
    from nanoseek.config import preset

    return preset("tiny").replace(vocab_size=512, num_hidden_layers=args.layers, n_routed_experts=8,
                                  num_experts_per_tok=2)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.pipelining.schedules as schedules

    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.parallel.config import ParallelConfig
    from nanoseek.parallel.runtime import ParallelRuntime

    torch.set_num_threads(args.threads)
    cfg = ParallelConfig(pp=args.pp, schedule=args.worker, microbatches=args.microbatches)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(model_config(args)).to(device)
    cfg.validate(model.config, device_type=device.type)
    cfg.validate_batch(args.batch)
    runtime = ParallelRuntime.for_run(cfg, device)
    device = runtime.device
    runtime.parallelize(model)
    pipe = runtime.pipeline
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    waits: list[tuple[float, float]] = []
    wait = schedules._wait_batch_p2p

    def timed_wait(work):  # every wait on a point-to-point transfer inside the schedules
        t0 = time.perf_counter()
        wait(work)
        if pipe.tracker.active:
            waits.append((t0, time.perf_counter()))

    schedules._wait_batch_p2p = timed_wait
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 512, (args.batch, args.seq_len), generator=g).to(device)
    times = []
    for step in range(args.warmup + args.steps):
        pipe.tracker.active = step == args.warmup + args.steps - 1  # the last step is recorded
        pipe.tracker.clear()
        waits.clear()
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pipe.step(batch, mtp_weight=0.3)
        if device.type == "cuda":
            torch.cuda.synchronize()
        scheduled = time.perf_counter()  # the schedule's part of the step: where the bubble is
        runtime.finish_gradients(model, 1.0)
        optimizer.step()
        runtime.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        if step >= args.warmup:
            times.append(t1 - t0)
    memory = pipe.memory_report()
    row = {"rank": runtime.ctx.rank, "step_times": times, "start": t0, "end": scheduled,
           "actions": [(a.stage_index, a.computation_type, a.microbatch_index, a.start, a.end)
                       for a in pipe.tracker.actions()],
           "waits": waits, "memory": memory}
    rows: list = [None] * runtime.world_size
    dist.all_gather_object(rows, row)
    if runtime.is_main:
        Path(args.out).write_text(json.dumps(rows))
    runtime.close()


def analyse(schedule: str, pp: int, rows: list[dict]) -> dict:
    """Step time, per-rank compute / transfer-wait / idle, F B I W means, and the formula's bubble."""
    step = statistics.median(max(r["step_times"][i] for r in rows) for i in range(len(rows[0]["step_times"])))
    start = min(r["start"] for r in rows)
    last_step = max(r["end"] for r in rows) - start
    durations: dict[str, list[float]] = {}
    ranks = []
    for r in sorted(rows, key=lambda r: r["rank"]):
        busy = sum(e - s for _, _, _, s, e in r["actions"])
        waited = sum(e - s for s, e in r["waits"])
        for _, kind, _, s, e in r["actions"]:
            durations.setdefault(kind, []).append(e - s)
        own = r["end"] - r["start"]
        ranks.append({"rank": r["rank"], "step": own, "compute": busy, "wait": waited, "idle": own - busy,
                      "bubble": (own - busy) / own})
    mean = {k: statistics.mean(v) for k, v in durations.items()}
    F = mean.get("F", 0.0)
    W = mean.get("W", 0.0)
    B = mean["B"] if "B" in mean and "I" not in mean else (
        statistics.mean(durations.get("B", []) + [mean["I"] + W] * len(durations.get("I", []))))
    if schedule in ("1f1b", "interleaved_1f1b"):
        formula, text = (pp - 1) * (F + B), "(PP-1)(F+B)"
    elif schedule == "zbv":
        formula, text = (pp - 1) * (F + B - 2 * W), "(PP-1)(F+B-2W)"
    else:
        stages = 2 * pp
        formula, text = (stages / 2 - 1) * ((F + B) + B - 3 * W), "(PP/2-1)(F&B+B-3W), PP=stages"
    return {"schedule": schedule, "step": step, "recorded_step": last_step, "ranks": ranks, "F": F, "B": B,
            "I": mean.get("I"), "W": W, "formula": formula, "formula_text": text,
            "memory": [r["memory"] for r in sorted(rows, key=lambda r: r["rank"])], "start": start}


def plot(results: list[dict], raw: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(results), 1, figsize=(12, 1.9 * len(results) + 0.6), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        rows = raw[res["schedule"]]
        start = res["start"]
        stages = sorted({a[0] for r in rows for a in r["actions"]})
        rank_of = {a[0]: r["rank"] for r in rows for a in r["actions"]}
        labels = []
        for y, s in enumerate(stages):
            labels.append(f"stage {s} (rank {rank_of[s]})")
            r = next(r for r in rows if r["rank"] == rank_of[s])
            for stage, kind, mb, t0, t1 in r["actions"]:
                if stage == s:
                    ax.broken_barh([((t0 - start) * 1e3, (t1 - t0) * 1e3)], (y - 0.4, 0.8), color=COLOURS[kind])
                    if (t1 - t0) * 1e3 > res["recorded_step"] * 1e3 / 60:
                        ax.text((t0 + t1) / 2 * 1e3 - start * 1e3, y, f"{kind}{mb}", ha="center", va="center",
                                fontsize=6, color="white")
            ax.broken_barh([((t0 - start) * 1e3, (t1 - t0) * 1e3) for t0, t1 in r["waits"]], (y - 0.45, 0.12),
                           color=COLOURS["wait"])
        ax.set_yticks(range(len(stages)), labels, fontsize=7)
        ax.invert_yaxis()
        idle = ", ".join(f"rank {x['rank']} {100 * x['bubble']:.0f}%" for x in res["ranks"])
        ax.set_title(f"{res['schedule']}: schedule {res['recorded_step'] * 1e3:.0f} ms; idle {idle}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("ms since the step started (one recorded step; the optimizer step follows)")
    fig.legend(handles=[Patch(color=COLOURS[k], label=t) for k, t in
                        (("F", "forward"), ("B", "backward (full or input)"), ("W", "weight backward"),
                         ("wait", "waiting on a transfer (rank)"))], loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedules", nargs="+", default=SCHEDULES, choices=SCHEDULES)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--layers", type=int, default=8, help="blocks (tiny preset otherwise; 8 experts, top-2)")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plot", default=str(ROOT / "docs" / "pipeline_timeline.png"))
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from parallel_launch import launch

    from nanoseek.parallel.pipeline_trace import memory_lines

    print(f"model: tiny with {args.layers} blocks, 8 experts top-2; global batch {args.batch} x {args.seq_len} in "
          f"{args.microbatches} micro-batches; pp={args.pp}; {args.threads} thread(s) per process; device "
          f"{args.device}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'schedule':<18}{'step ms':>8}{'sched ms':>9}{'F ms':>7}{'B ms':>7}{'W ms':>7}  "
          f"{'idle per rank ms (share)':<34}{'formula ms':>10}  formula")
    out = Path(f"/tmp/nanoseek_bench_pipeline_{os.getpid()}.json")
    results, raw = [], {}
    for schedule in args.schedules:
        forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k not in ("schedules", "worker", "out", "json") and v is not None]
        for rc, log in launch([__file__, *forwarded, "--worker", schedule, "--out", str(out)], args.pp, timeout=600):
            if rc != 0:
                raise SystemExit(f"schedule {schedule} failed:\n{log[-3000:]}")
        rows = json.loads(out.read_text())
        res = analyse(schedule, args.pp, rows)
        results.append(res)
        raw[schedule] = rows
        idle = " ".join(f"{x['idle'] * 1e3:.0f} ({100 * x['bubble']:.0f}%)" for x in res["ranks"])
        print(f"{schedule:<18}{res['step'] * 1e3:>8.0f}{res['recorded_step'] * 1e3:>9.0f}{res['F'] * 1e3:>7.1f}"
              f"{res['B'] * 1e3:>7.1f}{res['W'] * 1e3:>7.1f}  {idle:<34}{res['formula'] * 1e3:>10.0f}  "
              f"{res['formula_text']}", flush=True)
    out.unlink(missing_ok=True)
    print("\nmemory per stage (measured on the recorded step; planned = the schedule's own action list):")
    for res in results:
        for line in memory_lines([m for m in res["memory"]]):
            print("  " + line)
    if args.plot:
        plot(results, raw, Path(args.plot))
        print(f"\ntimeline: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
