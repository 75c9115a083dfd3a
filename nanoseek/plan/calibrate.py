"""`nanoseek plan --calibrate`: measure this machine (matmul throughput at the model's shapes, and a
gloo all-reduce between two local processes), then run real training steps of a small model
(nanoseek's own `Trainer.train_step`, fp32 on CPU) in a fresh process and compare the planner's
predicted peak memory and step time with the measured ones.

Memory is measured as the process's peak resident set (VmHWM) above what it held before the model
was built (the peak is reset there through /proc/self/clear_refs, so importing torch does not count).
The prediction is the planner's, for one device, ZeRO-0, fp32 state and activations, no reserve, with
the measured matmul rate (at the model's own GEMM shapes; the attention core and the output head + loss
timed as whole units at theirs) as the GEMM rate, the measured copy bandwidth as the memory bandwidth
(efficiencies 1) and the measured cost per dispatched op for the host-side costs (nanoseek/plan/host.py):
nothing in it is fitted to the measurement. The step time compared is the median measured step."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from nanoseek.config import PRESETS, ModelConfig, preset
from nanoseek.cost.models import load_config
from nanoseek.errors import UserError, require
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.plan.cluster import Cluster
from nanoseek.plan.host import HostCosts
from nanoseek.plan.layout import Layout
from nanoseek.plan.machine import (all_reduce_bytes_per_s, memory_bytes_per_s, op_seconds,
                                   shape_flops_per_s)
from nanoseek.plan.training import plan_training
from nanoseek.train.config import TrainerConfig
from nanoseek.train.core import Trainer

MEMORY_TARGET = 0.15  # issue 18: predicted peak memory within 15% of measured
TIME_TARGET = 0.30    # and step time within 30%


def model_gemms(cfg: ModelConfig, batch: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], float]]:
    """Every GEMM shape of one training step of a nanoseek model as (m, k, n) -> its forward FLOPs per
    step: each projection at its own width; the routed experts (token copies spread evenly), the
    attention core and the output head + loss (run once more per MTP module) as the units
    `nanoseek.plan.machine.shape_flops_per_s` times whole."""
    tokens, d, h = batch * seq_len, cfg.hidden_size, cfg.num_attention_heads
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    moe = sum(cfg.is_moe_layer(i) for i in range(layers))
    dense = layers - moe
    shapes: dict[str, tuple[tuple[int, ...], float]] = {}

    def add(name: str, shape: tuple[int, ...], count: float) -> None:
        if count > 0:
            flops = 2 * math.prod(shape) * count
            old = shapes.get(name)
            shapes[name] = (shape, flops + (old[1] if old else 0))

    dqk, dv, rq, rkv = cfg.qk_head_dim, cfg.v_head_dim, cfg.q_lora_rank, cfg.kv_lora_rank
    if rq:
        add("q_a_proj", (tokens, d, rq), layers)
        add("q_b_proj", (tokens, rq, h * dqk), layers)
    else:
        add("q_proj", (tokens, d, h * dqk), layers)
    add("kv_a_proj", (tokens, d, rkv + cfg.qk_rope_head_dim), layers)
    add("kv_b_proj", (tokens, rkv, h * (cfg.qk_nope_head_dim + dv)), layers)
    add("o_proj", (tokens, h * dv, d), layers)
    add("dense FFN up/gate", (tokens, d, cfg.intermediate_size), 2 * dense)
    add("dense FFN down", (tokens, cfg.intermediate_size, d), dense)
    if moe:
        ie, k, e = cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_routed_experts
        shapes["routed experts"] = (("experts", tokens * k, d, ie, e), 2 * tokens * k * d * 3 * ie * moe)
        add("router", (tokens, d, e), moe)
        if cfg.n_shared_experts:
            si = cfg.n_shared_experts * ie
            add("shared expert up/gate", (tokens, d, si), 2 * moe)
            add("shared expert down", (tokens, si, d), moe)
    # the attention core and the output head + loss are timed as whole units (kernel and elementwise work);
    # their FLOPs are counted as nanoseek.cost counts them (causal: half the T x T products)
    core = 2 * batch * h * seq_len * seq_len * (dqk + dv) / 2
    shapes["attention core"] = (("attention", batch, h, seq_len, dqk, dv), core * layers)
    head = 2 * tokens * d * cfg.vocab_size
    shapes["output head + loss"] = (("head+loss", batch, seq_len, d, cfg.vocab_size),
                                    head * (1 + cfg.num_nextn_predict_layers))
    if cfg.num_nextn_predict_layers:
        add("MTP eh_proj", (tokens, 2 * d, d), cfg.num_nextn_predict_layers)
    return shapes


class RandomTokens:
    """A batch source of random token ids (the step's cost does not depend on the values)."""

    def __init__(self, vocab: int, batch: int, seq_len: int):
        self.gen = torch.Generator().manual_seed(0)
        self.shape, self.vocab = (batch, seq_len), vocab

    def next_batch(self) -> torch.Tensor:
        return torch.randint(0, self.vocab, self.shape, generator=self.gen)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _rss(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def measure_step(config: dict[str, Any], batch: int, seq_len: int, steps: int) -> dict[str, Any]:
    """Run in a fresh process: build the model, train `steps` + 1 steps (the first allocates the AdamW
    moments and is not timed), return step times (`step_s`: the fastest in CPU seconds, as for the
    GEMM rates; wall-clock times too) and the peak RSS above the pre-model baseline."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.ones(64, 64) @ torch.ones(64, 64)
    baseline = _rss("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    cfg = ModelConfig.from_dict(config)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(TrainerConfig(out_dir=out, device="cpu", dtype="float32", max_steps=steps + 1,
                                        warmup_steps=1, tensorboard=False),
                          model, flops_per_token=1.0, tokens_per_step=batch * seq_len)
        source = RandomTokens(cfg.vocab_size, batch, seq_len)

        def loss_fn(m, ids):
            out = m(ids, labels=ids)
            return out.loss, {}

        cpu, wall = [], []
        for i in range(steps + 1):
            t0, w0 = time.process_time(), time.perf_counter()
            trainer.train_step(source, loss_fn)
            if i:
                cpu.append(time.process_time() - t0)
                wall.append(time.perf_counter() - w0)
    peak = _rss("VmHWM")
    return {"baseline_rss": baseline, "peak_rss": peak, "peak_above_baseline": peak - baseline, "hwm_reset": reset,
            "step_cpu_times": cpu, "step_s": min(cpu), "step_s_median": statistics.median(cpu),
            "step_wall_times": wall, "step_wall_s": min(wall)}


def _child_main() -> None:
    args = json.loads(sys.argv[1])
    print(json.dumps(measure_step(args["config"], args["batch"], args["seq_len"], args["steps"])))


def _config(spec: str) -> dict[str, Any]:
    if spec in PRESETS:
        return preset(spec).to_dict()
    name, raw = load_config(spec)
    if raw.get("model_type", "deepseek_v3") not in ("deepseek_v3", "deepseek_v2"):
        raise UserError(f"--calibrate trains a nanoseek (DeepSeek-V3 family) model; {name} is {raw.get('model_type')}")
    return ModelConfig.from_dict(raw).to_dict()


def cpu_cluster(gemm_rate: float, memory_bw: float, bus: float | None, op_s: float = 0.0) -> Cluster:
    """This machine as a one-"GPU" cluster: the measured rates are the achieved ones (efficiency 1), and
    the host-side costs a CPU pays in line (per-op overhead, torch's unfused AdamW)."""
    return Cluster("this CPU (1 thread)", 1, 1, 1e6, memory_bw / 1e12, {"fp32": gemm_rate / 1e12}, 1, 0, 1.0,
                   (bus or 1e9) / 1e9, None, "measured by nanoseek plan --calibrate", HostCosts(op_s))


def predict(config: dict[str, Any], cl: Cluster, batch: int, seq_len: int, name: str) -> dict[str, Any]:
    """The planner's plan of one fp32 training step on `cl`: one device, ZeRO-0, no reserve, torch's
    CPU attention (the math kernel)."""
    layout = Layout(pp=1, ep=1, zero=0, micro_batch=batch, global_batch=batch, seq_len=seq_len, precision="fp32",
                    activations="nanoseek", attention="math")
    return plan_training(config, cl, layout, gemm_efficiency=1.0, bw_efficiency=1.0, reserve_gb=0.0, name=name)


def check_fits_this_machine(plan: dict[str, Any]) -> None:
    """Refuse a model whose predicted training step needs more than half of this machine's memory."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = plan["memory"]["peak_bytes"]
    if need > ram / 2:
        raise UserError(f"--calibrate would train {plan['model']} here: predicted {need / 1e9:,.1f} GB, more than half "
                        f"of this machine's {ram / 1e9:,.1f} GB; calibrate with a small model (tiny, small, bench)")


def measure_machine(cfg: ModelConfig, batch: int, seq_len: int, collective: bool) -> dict[str, Any]:
    """Matmul rates at every GEMM shape of the model, the copy bandwidth (one thread each), and a gloo
    all-reduce between two local processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gemm = {name: (flops, shape_flops_per_s(shape))
                for name, (shape, flops) in model_gemms(cfg, batch, seq_len).items()}
        memory_bw = memory_bytes_per_s()
        overhead = op_seconds()
    finally:
        torch.set_num_threads(threads)
    # the rate the model's FLOPs run at when each GEMM runs at its measured speed (FLOP-weighted harmonic mean)
    rate = sum(f for f, _ in gemm.values()) / sum(f / r for f, r in gemm.values())
    return {"gemm_flops_per_s": {name: r for name, (_, r) in gemm.items()}, "gemm_rate_used": rate,
            "memory_bytes_per_s": memory_bw, "op_s": overhead["op_s"], "collective_measured": collective,
            "gloo_all_reduce_bytes_per_s": all_reduce_bytes_per_s() if collective else None}


def run_steps(config: dict[str, Any], batch: int, seq_len: int, steps: int) -> dict[str, Any]:
    """`measure_step` in a fresh process (its peak RSS is then the training's alone)."""
    child = subprocess.run([sys.executable, "-c", "from nanoseek.plan.calibrate import _child_main; _child_main()",
                            json.dumps({"config": config, "batch": batch, "seq_len": seq_len, "steps": steps})],
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "NANOSEEK_NO_PROGRESS": "1"})
    if child.returncode != 0:
        raise UserError(f"the calibration step failed: {child.stderr.strip().splitlines()[-1:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def calibrate(model: str = "small", *, seq_len: int = 256, batch: int = 4, steps: int = 5,
              collective: bool = True) -> dict[str, Any]:
    """Measure this machine, run real training steps of `model`, and compare with the planner."""
    require(batch >= 1, "--batch", batch, "a positive integer")
    require(1 <= steps <= 50, "--steps", steps, "an integer in [1, 50]")
    config = _config(model)
    require(2 <= seq_len <= config["max_position_embeddings"], "--seq-len", seq_len,
            f"in [2, max_position_embeddings={config['max_position_embeddings']}] for --calibrate")
    check_fits_this_machine(predict(config, cpu_cluster(1e9, 1e9, None), batch, seq_len, model))
    machine = measure_machine(ModelConfig.from_dict(config), batch, seq_len, collective)
    measured = run_steps(config, batch, seq_len, steps)
    bus = machine["gloo_all_reduce_bytes_per_s"]
    plan = predict(config, cpu_cluster(machine["gemm_rate_used"], machine["memory_bytes_per_s"], bus, machine["op_s"]),
                   batch, seq_len, model)
    dev = plan["memory"]["per_device"][0]
    mem_err = dev["total"] / measured["peak_above_baseline"] - 1
    # the typical (median) step: the fastest is the one with the fewest page faults of the moment
    time_err = plan["time"]["step_s"] / measured["step_s_median"] - 1
    return {
        "model": model, "batch": batch, "seq_len": seq_len, "threads": 1, **machine,
        # a 2-process data-parallel step would all-reduce the fp32 gradients: each rank sends them once
        "predicted_dp_sync_2_processes_s": None if bus is None else 4 * dev["params_on_device"] / bus,
        "predicted": {"peak_bytes": dev["total"], "step_s": plan["time"]["step_s"],
                      "step_parts": {k: plan["time"][k] for k in ("compute_s", "memory_bound_s", "optimizer_s",
                                                                  "framework_s")},
                      "framework_ops": plan["time"]["framework_ops"],
                      "breakdown": {k: v for k, v in dev.items() if k != "total"}},
        "measured": measured,
        "memory_error": mem_err, "time_error": time_err,
        "time_error_fastest": plan["time"]["step_s"] / measured["step_s"] - 1,
        "memory_within_target": abs(mem_err) <= MEMORY_TARGET, "time_within_target": abs(time_err) <= TIME_TARGET,
        "assumptions": plan["assumptions"],
    }


def calibration_text(r: dict[str, Any]) -> str:
    m, p = r["measured"], r["predicted"]
    gemm = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in r["gemm_flops_per_s"].items())
    bus = r["gloo_all_reduce_bytes_per_s"]
    lines = [f"calibration: {r['model']}, batch {r['batch']} x {r['seq_len']} tokens, fp32, 1 CPU thread",
             f"  matmul GFLOP/s (fp32, forward + both gradient GEMMs) at the model's shapes: {gemm}",
             f"  rate used (FLOP-weighted over those): {r['gemm_rate_used'] / 1e9:.1f} GFLOP/s",
             f"  memory bandwidth (fp32 copy, 1 thread): {r['memory_bytes_per_s'] / 1e9:.1f} GB/s",
             f"  per-op overhead (a tiny model's training step, per dispatched op): {r['op_s'] * 1e6:.2f} us",
             "  gloo all-reduce, 2 local processes: " + ("not measured" if not r["collective_measured"] else
                                                         "could not start" if bus is None else
                                                         f"{bus / 1e9:.2f} GB/s (8 MB tensor)"),
             f"  peak memory: predicted {p['peak_bytes'] / 1e6:,.1f} MB, "
             f"measured {m['peak_above_baseline'] / 1e6:,.1f} MB "
             f"above the pre-model RSS ({r['memory_error']:+.1%}; target within {MEMORY_TARGET:.0%}: "
             f"{'met' if r['memory_within_target'] else 'MISSED'})",
             f"  step time: predicted {p['step_s'] * 1e3:,.1f} ms, measured {m['step_s_median'] * 1e3:,.1f} ms of CPU "
             f"time (median of {len(m['step_cpu_times'])} steps; {r['time_error']:+.1%}; target within "
             f"{TIME_TARGET:.0%}: {'met' if r['time_within_target'] else 'MISSED'}); fastest step "
             f"{m['step_s'] * 1e3:,.1f} ms ({r['time_error_fastest']:+.1%}), fastest wall-clock "
             f"{m['step_wall_s'] * 1e3:,.1f} ms",
             "  predicted step: " + ", ".join(f"{k[:-2]} {v * 1e3:,.1f} ms" for k, v in p["step_parts"].items())
             + f" (memory-bound work is part of compute; framework = {p['framework_ops']:,} ops x "
             f"{r['op_s'] * 1e6:.2f} us)",
             "  predicted memory breakdown: " + ", ".join(
                 f"{k} {v / 1e6:,.1f} MB" for k, v in p["breakdown"].items()
                 if k not in ("params_on_device", "micro_batches_held") and v)]
    return "\n".join(lines)
