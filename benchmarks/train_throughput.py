"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM on the `bench` preset, same run.

    python benchmarks/train_throughput.py [--dtype both|float32|bfloat16] [--repeats 7] [--block 3]
                                          [--warmup 2] [--threads 1] [--device cpu]

The protocol (docs/performance.md, "Training", says why each part is there):
- identical work: both models hold the same weights, train with the same AdamW on the same batches
  (8 x 256 tokens), and minimise the same loss, the mean next-token cross-entropy over B x (T-1)
  positions computed in float32 from the logits; nanoseek's balance loss is off (transformers has none)
  and the bench preset has no MTP module. The first-step losses are printed: they must agree.
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

from nanoseek.config import preset
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
          f"{args.repeats} rounds of {args.block}-step blocks (AB/BA alternating); "
          f"load average {load_before[0]:.2f} before")
    print("same loss for both: mean next-token cross-entropy in float32; nanoseek balance loss off, no MTP")
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    for dtype in dtypes:
        runner = Runner(models, batches, torch.bfloat16 if dtype == "bfloat16" else None)
        blocks = measure(runner, args.warmup, args.repeats, args.block)
        losses = ", ".join(f"{n} {runner.first_loss[n]:.4f}" for n in NAMES)
        print(f"{dtype}{' autocast' if dtype == 'bfloat16' else ''}: first-step loss {losses}")
        report(blocks, tokens)
    print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
