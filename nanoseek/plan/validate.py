"""`nanoseek plan --validate`: the planner against our own CPU runs, four of them back to back.

Each run is one `calibrate` (nanoseek/plan/calibrate.py): measure this machine at the model's shapes,
then train the model for real in a fresh process, then compare the planner's predicted peak memory
and step time with the measured ones. The runs were chosen before any prediction was made, to vary
the model (tiny, small, bench), the tokens per step and the sequence length (where the attention
core's T x T work takes over). The machine's load average is recorded around each run: the rates and
the steps are CPU time, which waiting for a core does not inflate, but a loaded machine still shares
its caches and memory bandwidth."""

from __future__ import annotations

import datetime
import os
import statistics
from typing import Any

from nanoseek.plan.calibrate import MEMORY_TARGET, TIME_TARGET, calibrate

VALIDATION_RUNS = (("small", 4, 256), ("bench", 4, 256), ("small", 2, 512), ("tiny", 8, 512))


def validate(runs=VALIDATION_RUNS, steps: int = 5) -> dict[str, Any]:
    """Calibrate and measure every (model, batch, seq_len) of `runs`; the step time compared is the
    median of `steps` timed steps (the fastest is reported too)."""
    rows = []
    for model, batch, seq_len in runs:
        load_before = os.getloadavg()
        r = calibrate(model, seq_len=seq_len, batch=batch, steps=steps, collective=False)
        r["load_average_before"], r["load_average_after"] = load_before, os.getloadavg()
        rows.append(r)
    time_ok = sum(r["time_within_target"] for r in rows)
    mem_ok = sum(r["memory_within_target"] for r in rows)
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu_count": os.cpu_count(), "runs": rows, "time_within_target": time_ok,
            "memory_within_target": mem_ok, "time_target": TIME_TARGET, "memory_target": MEMORY_TARGET}


def validation_text(v: dict[str, Any]) -> str:
    lines = [f"validation {v['date']}, 1 thread, CPU time, {v['cpu_count']} cores; step = median of the timed "
             "steps (fastest in brackets)",
             "| model, tokens per step | predicted peak | measured peak (RSS) | error | predicted step | measured step "
             "(median; fastest) | error (median; fastest) | load average before / after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in v["runs"]:
        m, p = r["measured"], r["predicted"]
        lines.append(
            f"| {r['model']}, {r['batch']} x {r['seq_len']} | {p['peak_bytes'] / 1e6:,.1f} MB | "
            f"{m['peak_above_baseline'] / 1e6:,.1f} MB | {r['memory_error']:+.1%} | {p['step_s'] * 1e3:,.1f} ms | "
            f"{m['step_s_median'] * 1e3:,.1f} ms ({m['step_s'] * 1e3:,.1f}) | {r['time_error']:+.1%} "
            f"({r['time_error_fastest']:+.1%}) | {r['load_average_before'][0]:.1f} / "
            f"{r['load_average_after'][0]:.1f} |")
    lines.append(f"step time within {v['time_target']:.0%}: {v['time_within_target']} of {len(v['runs'])}; "
                 f"peak memory within {v['memory_target']:.0%}: {v['memory_within_target']} of {len(v['runs'])}")
    lines.append("predicted step parts (ms): " + "; ".join(
        f"{r['model']} {r['batch']}x{r['seq_len']}: " + ", ".join(
            f"{k[:-2]} {s * 1e3:,.1f}" for k, s in r["predicted"]["step_parts"].items()) for r in v["runs"]))
    lines.append("machine: " + "; ".join(
        f"{r['model']} {r['batch']}x{r['seq_len']}: GEMM {r['gemm_rate_used'] / 1e9:.0f} GFLOP/s (attention core "
        f"{r['gemm_flops_per_s']['attention core'] / 1e9:.0f}), copy {r['memory_bytes_per_s'] / 1e9:.0f} GB/s, "
        f"{r['op_s'] * 1e6:.2f} us/op" for r in v["runs"]))
    spread = [statistics.pstdev(r["measured"]["step_cpu_times"]) / statistics.mean(r["measured"]["step_cpu_times"])
              for r in v["runs"]]
    lines.append("step-to-step spread of the measured CPU times (std/mean): "
                 + ", ".join(f"{s:.1%}" for s in spread))
    return "\n".join(lines)
