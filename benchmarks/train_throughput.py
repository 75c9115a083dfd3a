"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM on the `bench` preset, same run.

Both models hold the same weights, train with AdamW on the same random batches (8 x 256 tokens) and are
timed alternately, so machine noise hits both alike. Prints tokens/s of each and the ratio.

    python benchmarks/train_throughput.py [--steps 6] [--warmup 2] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from nanoseek.config import preset
from nanoseek.hf import save_pretrained
from nanoseek.model import DeepseekV3ForCausalLM


def load_reference(path: str):
    from transformers import AutoModelForCausalLM

    kwargs = dict(attn_implementation="sdpa", dtype=torch.float32)
    try:
        return AutoModelForCausalLM.from_pretrained(path, experts_implementation="grouped_mm", **kwargs)
    except (TypeError, ValueError) as e:  # older transformers without the option
        print(f"note: transformers without experts_implementation=grouped_mm ({e})", file=sys.stderr)
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def train_step(model, opt, batch, autocast_dtype, ours: bool):
    with torch.autocast(batch.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(batch, labels=batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(models, batches, steps, warmup, autocast_dtype):
    """Alternate one step of each model; return seconds per step per model (after warm-up)."""
    times = {name: 0.0 for name in models}
    for i in range(warmup + steps):
        for name, (model, opt) in models.items():
            batch = batches[i % len(batches)]
            sync(batch.device)
            t0 = time.perf_counter()
            train_step(model, opt, batch, autocast_dtype, ours=name == "nanoseek")
            sync(batch.device)
            if i >= warmup:
                times[name] += time.perf_counter() - t0
    return {name: t / steps for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16 = autocast over float32 weights")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = preset("bench", aux_loss_alpha=0.0)  # transformers has no balance loss: compare like for like
    ours = DeepseekV3ForCausalLM(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        ref = load_reference(d).train().to(args.device)
    ours.to(args.device)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device) for _ in range(4)]
    models = {name: (m, torch.optim.AdamW(m.parameters(), lr=1e-4)) for name, m in
              [("nanoseek", ours), ("transformers", ref)]}
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    sec = measure(models, batches, args.steps, args.warmup, autocast)
    tokens = args.batch * args.seq
    print(f"bench preset, batch {args.batch} x {args.seq}, {args.dtype}, {args.steps} timed steps, "
          f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    for name, s in sec.items():
        print(f"  {name:13s} {tokens / s:9.0f} tokens/s  ({s * 1000:.0f} ms/step)")
    print(f"  ratio nanoseek / transformers: {sec['transformers'] / sec['nanoseek']:.2f}x")


if __name__ == "__main__":
    main()
