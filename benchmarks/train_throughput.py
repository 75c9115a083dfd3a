"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM on the `bench` preset, same run.

    python benchmarks/train_throughput.py [--dtype both|float32|bfloat16] [--repeats 7] [--block 3]
                                          [--warmup 2] [--threads 1] [--device cpu]
    python benchmarks/train_throughput.py --profile [--dtype ...]   # where a step goes, by part of the model

The protocol (docs/performance.md, "Training", says why each part is there):
- identical work: both models hold the same weights, train with the same AdamW on the same batches
  (8 x 256 tokens), and minimise the same loss, the mean next-token cross-entropy over B x (T-1)
  positions computed in float32 from the logits; nanoseek's balance loss is off (transformers has none)
  and the bench preset has no MTP module. The first-step losses are printed: they agree (in bf16 to
  ~1e-3: transformers' grouped_mm keeps its routed experts in float32 under autocast, nanoseek's run in bf16).
- warm-up steps of each model are discarded;
- then `repeats` rounds, each a block of `block` steps of one model next to a block of the other, the
  order alternating round by round (AB, BA, AB, ...), so a drift in machine load or a cache effect of
  switching models falls on both alike; a block's figure is the median of its steps;
- each round gives one ratio from its two adjacent blocks; the ratio printed is the median over rounds
  with its min-max and interquartile range, and every tokens/s figure comes with its spread too;
- two clocks: wall time, and process CPU time, which on a shared machine leaves out the time other
  processes hold the core (at 1 thread both agree on a quiet machine; with more threads, CPU time also
  counts OpenMP threads spinning, so wall time is the figure then);
- one thread by default: on a loaded 2-core machine two OpenMP threads wait on each other for whole
  scheduler slices. The thread count and the load average before and after are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from torch.profiler import profile, record_function

from nanoseek.config import ModelConfig, preset
from nanoseek.hf import save_pretrained
from nanoseek.model import DeepseekV3ForCausalLM

NAMES = ("nanoseek", "transformers")


# ---------------------------------------------------------------------- statistics (tested)
@dataclass
class Spread:
    median: float
    q1: float
    q3: float
    lo: float
    hi: float

    def scaled(self, f) -> "Spread":
        """The spread of f(x) for a monotonic f (a decreasing f swaps the ends)."""
        vals = [f(v) for v in (self.median, self.q1, self.q3, self.lo, self.hi)]
        if vals[3] > vals[4]:
            vals = [vals[0], vals[2], vals[1], vals[4], vals[3]]
        return Spread(*vals)


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty list (q in [0, 1])."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    i = int(pos)
    return s[i] if i == len(s) - 1 else s[i] + (s[i + 1] - s[i]) * (pos - i)


def spread(xs: list[float]) -> Spread:
    if not xs:
        raise ValueError("no values")
    return Spread(statistics.median(xs), quantile(xs, 0.25), quantile(xs, 0.75), min(xs), max(xs))


def round_orders(repeats: int, first: str = NAMES[0], second: str = NAMES[1]) -> list[tuple[str, str]]:
    """Which model runs first in each round: AB, BA, AB, ... so that neither always follows the other."""
    return [(first, second) if r % 2 == 0 else (second, first) for r in range(repeats)]


def round_ratios(ours: list[float], ref: list[float]) -> list[float]:
    """Per-round speed ratio nanoseek / transformers from the seconds per step of the two adjacent blocks."""
    if len(ours) != len(ref):
        raise ValueError("one block of each model per round")
    return [r / o for o, r in zip(ours, ref)]


def fmt(s: Spread, unit: str = "", digits: int = 0) -> str:
    f = f"{{:,.{digits}f}}"
    return (f"{f.format(s.median)}{unit} (IQR {f.format(s.q1)}-{f.format(s.q3)}, "
            f"min-max {f.format(s.lo)}-{f.format(s.hi)})")


# ---------------------------------------------------------------------- models and steps
def load_reference(path: str):
    from transformers import AutoModelForCausalLM

    kwargs = dict(attn_implementation="sdpa", dtype=torch.float32)
    try:
        return AutoModelForCausalLM.from_pretrained(path, experts_implementation="grouped_mm", **kwargs)
    except (TypeError, ValueError) as e:  # older transformers without the option
        print(f"note: transformers without experts_implementation=grouped_mm ({e})", file=sys.stderr)
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def build(device: str, seed: int = 0):
    """Both models on the same weights, each with its AdamW. nanoseek's balance loss is off: transformers
    has none, and the comparison is of the same loss."""
    torch.manual_seed(seed)
    cfg = preset("bench", aux_loss_alpha=0.0)
    ours = DeepseekV3ForCausalLM(cfg).train()
    assert len(ours.mtp) == 0, "the bench preset has no MTP module (transformers has none to compare)"
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        ref = load_reference(d).train().to(device)
    ours.to(device)
    return cfg, {name: (m, torch.optim.AdamW(m.parameters(), lr=1e-4)) for name, m in zip(NAMES, (ours, ref))}


def train_step(model, opt, batch, autocast_dtype) -> float:
    with torch.autocast(batch.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()  # also a host sync on accelerators


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    """Steps the models over a fixed list of batches, each model with its own step counter (so both see
    the same batch at their n-th step), and records wall and CPU seconds per step."""

    def __init__(self, models, batches, autocast_dtype):
        self.models, self.batches, self.autocast = models, batches, autocast_dtype
        self.count = {name: 0 for name in models}
        self.first_loss: dict[str, float] = {}

    def step(self, name: str) -> tuple[float, float]:
        model, opt = self.models[name]
        batch = self.batches[self.count[name] % len(self.batches)]
        sync(batch.device)
        c0, t0 = time.process_time(), time.perf_counter()
        loss = train_step(model, opt, batch, self.autocast)
        sync(batch.device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.first_loss.setdefault(name, loss)
        self.count[name] += 1
        return wall, cpu

    def block(self, name: str, steps: int) -> tuple[float, float]:
        """Median wall and CPU seconds per step over `steps` steps of one model."""
        times = [self.step(name) for _ in range(steps)]
        return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def measure(runner: Runner, warmup: int, repeats: int, block: int) -> dict:
    for i in range(warmup):  # discarded: first-touch allocations, oneDNN primitive creation, caches
        for name in round_orders(warmup)[i]:
            runner.step(name)
    blocks = {name: {"wall": [], "cpu": []} for name in NAMES}
    for order in round_orders(repeats):
        for name in order:
            wall, cpu = runner.block(name, block)
            blocks[name]["wall"].append(wall)
            blocks[name]["cpu"].append(cpu)
    return blocks


def report(blocks: dict, tokens: int) -> dict[str, Spread]:
    ratios = {}
    for clock in ("wall", "cpu"):
        for name in NAMES:
            tps = spread(blocks[name][clock]).scaled(lambda s: tokens / s)
            print(f"  {clock:4s} {name:13s} {fmt(tps)} tokens/s")
        ratios[clock] = spread(round_ratios(blocks["nanoseek"][clock], blocks["transformers"][clock]))
        print(f"  {clock:4s} ratio nanoseek / transformers: {fmt(ratios[clock], 'x', 2)}")
    return ratios


# ---------------------------------------------------------------------- where a step goes (--profile)
# Module class (nanoseek's or transformers') -> the part of the model its ops are booked to.
PART_OF_MODULE = {
    "RMSNorm": "norms", "DeepseekV3RMSNorm": "norms", "MLA": "attention", "DeepseekV3Attention": "attention",
    "Router": "MoE routing", "DeepseekV3TopkRouter": "MoE routing", "GroupedExperts": "experts",
    "DeepseekV3Experts": "experts", "MoE": "moe", "DeepseekV3MoE": "moe", "FFN": "ffn", "DeepseekV3MLP": "ffn",
    "Embedding": "top", "RotaryEmbedding": "attention", "DeepseekV3RotaryEmbedding": "attention",
}
PARTS = ["attention projections", "attention core (SDPA)", "attention other (RoPE, split, cat)", "MoE routing",
         "routed expert GEMMs", "MoE dispatch/combine", "experts: SwiGLU, weighting, casts",
         "dense FFN + shared experts", "norms", "lm_head GEMM", "loss (log-softmax + NLL)",
         "residual adds, casts, copies, embedding", "optimizer (AdamW, zero_grad)",
         "autograd engine, Python between ops"]
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "grouped_mm",
            "MmBackward", "BmmBackward")
DISPATCH_OPS = ("index", "sort", "histc", "bincount", "cumsum", "scatter", "gather", "one_hot", "where",
                "nonzero", "div")


def part_flops(cfg: ModelConfig, tokens: int, seq: int) -> dict[str, float]:
    """FLOPs per training step of the matmul-bearing parts (2 per multiply-add, backward = 2 x forward;
    the attention core counted over the full T x T, as SDPA's math path computes it)."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    q = d * h * cfg.qk_head_dim if cfg.q_lora_rank is None else cfg.q_lora_rank * (d + h * cfg.qk_head_dim)
    proj = q + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (
        cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.v_head_dim * d
    moe = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
    macs = {
        "attention projections": proj * len(moe),
        "attention core (SDPA)": h * seq * (cfg.qk_head_dim + cfg.v_head_dim) * len(moe),
        "routed expert GEMMs": sum(moe) * cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size,
        "dense FFN + shared experts": (len(moe) - sum(moe)) * 3 * d * cfg.intermediate_size
        + sum(moe) * 3 * d * cfg.moe_intermediate_size * cfg.n_shared_experts,
        "MoE routing": sum(moe) * d * cfg.n_routed_experts,
        "lm_head GEMM": d * cfg.vocab_size,
    }
    return {k: 6.0 * v * tokens for k, v in macs.items()}


def label_modules(model) -> list:
    """Forward hooks that open a record_function range `part::<kind>` around each labelled module."""
    handles, open_ranges = [], []
    for name, module in model.named_modules():
        kind = "lm_head" if name == "lm_head" else PART_OF_MODULE.get(type(module).__name__)
        if kind is None:
            continue

        def enter(m, args, kind=kind):
            r = record_function("part::" + kind)
            r.__enter__()
            open_ranges.append(r)

        def leave(m, args, out):
            open_ranges.pop().__exit__(None, None, None)
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def part_of(kinds: list[str], op: str, gemm: bool, sdpa: bool) -> str:
    """The part an op belongs to, from the module kinds around it (innermost first) and what it is."""
    inner = kinds[0] if kinds else "top"
    if inner == "experts":
        return ("routed expert GEMMs" if gemm else "MoE dispatch/combine" if any(d in op for d in DISPATCH_OPS)
                else "experts: SwiGLU, weighting, casts")
    if inner == "moe":
        return "MoE dispatch/combine"
    if inner == "attention":
        return ("attention core (SDPA)" if sdpa else "attention projections" if gemm
                else "attention other (RoPE, split, cat)")
    if inner == "ffn":
        return "dense FFN + shared experts"
    if inner == "lm_head":
        return "lm_head GEMM"
    if inner == "top":
        return ("loss (log-softmax + NLL)" if any(k in op for k in ("log_softmax", "nll_loss"))
                else "residual adds, casts, copies, embedding")
    return inner  # norms, MoE routing


ENGINE, OPTIMIZER = "autograd engine, Python between ops", "optimizer (AdamW, zero_grad)"
PASSES = ("forward", "backward", "optimizer")


def step_parts(events, steps: int) -> list[dict[tuple[str, str], float]]:
    """Seconds of profiled self time per (pass, part) and step. Forward ops are booked by the module around
    them; a backward op by the forward op that made its autograd node (the profiler's sequence numbers)."""
    forward = {}  # sequence number -> (depth, module kinds, under SDPA) of its outermost forward op
    info = {}
    for ev in events:
        chain = list(ancestors(ev))
        names = [e.name for e in chain]
        kinds = [n[6:] for n in names if n.startswith("part::")]
        phase = next((n[7:] for n in names if n.startswith("phase::")), None)
        step = next((int(n[6:]) for n in names if n.startswith("step::")), None)
        gemm = any(g in n for n in names for g in GEMM_OPS)
        sdpa = any("scaled_dot_product" in n for n in names)
        node = next((e for e in chain if e.name.startswith("autograd::engine::evaluate_function")), None)
        info[id(ev)] = (kinds, phase, step, gemm, sdpa, node)
        if phase == "forward" and ev.sequence_nr is not None and ev.sequence_nr >= 0:
            if ev.sequence_nr not in forward or len(chain) < forward[ev.sequence_nr][0]:
                forward[ev.sequence_nr] = (len(chain), kinds, sdpa)
    totals = [{} for _ in range(steps)]
    for ev in events:
        kinds, phase, step, gemm, sdpa, node = info[id(ev)]
        seconds = ev.self_cpu_time_total / 1e6
        if step is None or phase is None or seconds == 0:
            continue
        if phase == "optimizer":
            part = OPTIMIZER
        elif ev.name.startswith(("phase::", "part::")):  # Python between the ops of a pass or a module
            part = ENGINE
        elif phase == "forward":
            part = part_of(kinds, ev.name, gemm, sdpa)
        elif node is None or node.sequence_nr not in forward:
            part = ENGINE
        else:
            _, fwd_kinds, fwd_sdpa = forward[node.sequence_nr]
            part = part_of(fwd_kinds, ev.name, gemm, fwd_sdpa)
        totals[step][phase, part] = totals[step].get((phase, part), 0.0) + seconds
    return totals


def profile_model(model, opt, batches, autocast_dtype, steps: int) -> tuple[dict[tuple[str, str], float], float]:
    """Median share of a step per (pass, part), and the median CPU seconds per step (taken in the same run)."""
    handles = label_modules(model)
    cpu = []
    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            batch = batches[i % len(batches)]
            c0 = time.process_time()
            with record_function(f"step::{i}"):
                with record_function("phase::forward"), torch.autocast(
                        batch.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = model(batch, labels=batch).loss
                with record_function("phase::backward"):
                    loss.backward()
                with record_function("phase::optimizer"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            cpu.append(time.process_time() - c0)
    for h in handles:
        h.remove()
    per_step = step_parts(prof.events(), steps)
    keys = [(ps, part) for ps in PASSES for part in PARTS]
    shares = {k: statistics.median(t.get(k, 0.0) / sum(t.values()) for t in per_step) for k in keys}
    return shares, statistics.median(cpu)


def print_profile(models, batches, autocast_dtype, warmup: int, steps: int, flops: dict[str, float]) -> None:
    results = {}
    for name in NAMES:
        model, opt = models[name]
        for i in range(warmup):
            train_step(model, opt, batches[i % len(batches)], autocast_dtype)
        results[name] = profile_model(model, opt, batches, autocast_dtype, steps)
    print(f"  CPU s/step (median of {steps}): "
          + ", ".join(f"{n} {results[n][1]:.3f}" for n in NAMES) + f"; step FLOPs {sum(flops.values()) / 1e9:.1f} G")

    def ms(name, ps, part):
        shares, seconds = results[name]
        return 1000 * shares[ps, part] * seconds

    for name in NAMES:
        print(f"  {name}: forward {sum(ms(name, 'forward', p) for p in PARTS):.0f} ms, backward "
              f"{sum(ms(name, 'backward', p) for p in PARTS):.0f} ms, optimizer "
              f"{sum(ms(name, 'optimizer', p) for p in PARTS):.0f} ms")
    print("  | part | nanoseek fwd / bwd ms | share | transformers fwd / bwd ms | share | GFLOP | nanoseek GFLOP/s |")
    print("  |---|---|---|---|---|---|---|")
    for part in PARTS:
        cells = []
        for name in NAMES:
            f, b, o = (ms(name, ps, part) for ps in PASSES)
            share = 100 * sum(results[name][0][ps, part] for ps in PASSES)
            cells.append(f"{o:.0f} (step)" if part == OPTIMIZER else f"{f:.0f} / {b:.0f}")
            cells.append(f"{share:.1f}%")
        total = sum(ms("nanoseek", ps, part) for ps in PASSES)
        gf = flops.get(part)
        rate = f"{gf / 1e9 / (total / 1000):.0f}" if gf and total > 0 else ""
        print(f"  | {part} | " + " | ".join(cells) + f" | {'' if gf is None else f'{gf / 1e9:.2f}'} | {rate} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["both", "float32", "bfloat16"], default="both",
                   help="bfloat16 = autocast over float32 weights")
    p.add_argument("--repeats", type=int, default=7, help="rounds of one block per model")
    p.add_argument("--block", type=int, default=3, help="steps per block")
    p.add_argument("--warmup", type=int, default=2, help="discarded steps per model (per dtype)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", action="store_true", help="instead of timing: where a step goes, by part")
    p.add_argument("--profile-steps", type=int, default=4)
    args = p.parse_args()
    if min(args.repeats, args.block) < 1 or args.warmup < 0:
        p.error("--repeats and --block must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    cfg, models = build(args.device)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device) for _ in range(4)]
    tokens = args.batch * args.seq
    print(f"bench preset, batch {args.batch} x {args.seq}, torch {torch.__version__}, {args.device}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus; {args.warmup} warm-up steps per model, "
          + (f"{args.profile_steps} profiled steps; " if args.profile else
             f"{args.repeats} rounds of {args.block}-step blocks (AB/BA alternating); ")
          + f"load average {load_before[0]:.2f} before")
    print("same loss for both: mean next-token cross-entropy in float32; nanoseek balance loss off, no MTP")
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    for dtype in dtypes:
        autocast = torch.bfloat16 if dtype == "bfloat16" else None
        if args.profile:
            print(f"{dtype}{' autocast' if dtype == 'bfloat16' else ''}: profiled parts (shares of profiled time, "
                  f"ms = share x CPU time per step)")
            print_profile(models, batches, autocast, args.warmup, args.profile_steps,
                          part_flops(cfg, tokens, args.seq))
            continue
        runner = Runner(models, batches, autocast)
        blocks = measure(runner, args.warmup, args.repeats, args.block)
        losses = ", ".join(f"{n} {runner.first_loss[n]:.4f}" for n in NAMES)
        print(f"{dtype}{' autocast' if dtype == 'bfloat16' else ''}: first-step loss {losses}")
        report(blocks, tokens)
    print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
