"""The CUDA checks a session runs when a GPU is lent: one prepared script, each section one JSON line.

    python benchmarks/gpu_check.py                        # on the GPU machine (not yet run on one: no GPU was lent)
    python benchmarks/gpu_check.py --device cpu --quick   # a dry run of the script itself at toy sizes (~10 s)

It replaces benchmarks/gpu_check.sh, whose flags no longer matched train_throughput.py. What it covers is
what the open issues ask of a GPU: FP8 GEMMs and speed (docs/fp8.md), the single-GPU and bf16 FSDP paths
(docs/distributed.md), MFU of a model large enough to matter (docs/performance.md). torchtitan's side of the
MFU comparison needs torchtitan installed on the GPU machine, which cannot reach a package index: carry a
wheel (`pip download torchtitan --no-deps`) and its dependencies in an ignored folder.

Sections (a failing section prints its error and the others still run; `--only a,b` picks some):
  env          torch / CUDA / GPU name, compute capability, FP8 support as nanoseek sees it
  fp8_gemm     the blockwise FP8 GEMM on the device (`nanoseek.fp8.gemm.scaled_gemm`, edge blocks included)
               against a float64 computation of the same quantised operands: max relative error
  fp8_linear   `FP8Linear` forward and backward on the device against the same on CPU (the CPU path is pinned
               to float64 in tests/test_fp8.py): max relative difference of output, dx and dW
  fp8_speed    forward + backward of a hidden-2048 MoE, BF16 autocast vs FP8 + BF16 autocast: median step
               time and the ratio (issue: >= 1.3x faster)
  single_gpu   `run_pretraining` on the device through the trivial 1-rank mesh (NCCL group of one process),
               30 steps of the `bench` preset, then a resume to step 40 from the DCP checkpoint of step 30
  fsdp_bf16    FSDP2 over a 1-rank mesh with the GPU mixed-precision policy (bf16 compute, fp32 reduce),
               one step, against plain BF16 autocast on the same batch: loss and grad-norm difference
  mfu          a ~1.9B-total MoE (hidden 2048, 16 layers, 64 routed experts top-6, MLA as in V2-Lite,
               seq 4096), BF16 autocast, one GPU: tokens/s and MFU against the device's BF16 peak

Results also go to $OUT/gpu_check.jsonl when $OUT is set (the device machine's output folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def emit(section: str, result: dict) -> None:
    line = json.dumps({"section": section, **result})
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "gpu_check.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeat: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------- sections
def env(device: torch.device, quick: bool) -> dict:
    from nanoseek.fp8 import fp8_unsupported

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "fp8_unsupported": fp8_unsupported(device)}
    if device.type == "cuda":
        out.update(name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)))
    return out


def fp8_gemm(device: torch.device, quick: bool) -> dict:
    from nanoseek.fp8.gemm import scaled_gemm
    from nanoseek.fp8.quantize import block_scales_per_row, dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles

    out = {}
    g = torch.Generator().manual_seed(0)
    for M, K, N in ((64, 200, 96),) if quick else ((64, 200, 96), (512, 1000, 384), (4096, 2048, 2048)):
        a, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        aq, as_ = quantize_tiles(a)
        bq, bs = quantize_blocks(b)
        reference = dequantize_tiles(aq, as_).double() @ dequantize_blocks(bq, bs).double().t()
        got = scaled_gemm(aq.to(device), as_.to(device), bq.to(device),
                          block_scales_per_row(bs, N).to(device)).double().cpu()
        out[f"{M}x{K}x{N}_max_rel_err"] = float((got - reference).abs().max() / reference.abs().max())
    return out


def fp8_linear(device: torch.device, quick: bool) -> dict:
    from nanoseek.fp8.linear import fp8_linear as fp8_linear_fn

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(96 if quick else 1024, 384, generator=g), torch.randn(256, 384, generator=g) * 0.05
    dy = torch.randn(x.shape[0], 256, generator=g)
    results = {}
    for where in ("cpu", device):
        xi, wi = x.to(where).requires_grad_(), w.to(where).requires_grad_()
        y = fp8_linear_fn(xi, wi)
        y.backward(dy.to(where))
        results[str(where)] = (y.detach().cpu(), xi.grad.cpu(), wi.grad.cpu())
    cpu, dev = results["cpu"], results[str(device)]
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    return {"out_rel": rel(dev[0], cpu[0]), "dx_rel": rel(dev[1], cpu[1]), "dw_rel": rel(dev[2], cpu[2])}


def _moe_config(quick: bool, layers: int = 4):
    from nanoseek.config import preset

    if quick:
        return preset("tiny")
    return preset("v2-lite", num_hidden_layers=layers, moe_intermediate_size=256, intermediate_size=5632,
                  vocab_size=32000, max_position_embeddings=4096, rope_scaling=None)


def fp8_speed(device: torch.device, quick: bool) -> dict:
    from nanoseek.fp8 import fp8_model_build
    from nanoseek.model import DeepseekV3ForCausalLM

    cfg = _moe_config(quick)
    batch, seq = (2, 64) if quick else (4, 2048)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    out = {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "tokens": batch * seq}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        torch.manual_seed(0)
        with fp8_model_build(fp8):
            model = DeepseekV3ForCausalLM(cfg).to(device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        out[f"{name}_step_s"] = median_seconds(step, device, 2 if quick else 5)
        del model
    out["fp8_speedup"] = out["bf16_step_s"] / out["fp8_step_s"]
    return out


def single_gpu(device: torch.device, quick: bool) -> dict:
    from nanoseek.data import prepare, synthetic_corpus, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.train.config import PretrainConfig, load_train_config
    from nanoseek.train.pretrain import run_pretraining

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    write_corpus(synthetic_corpus(400, seed=0), work / "corpus.jsonl")
    tok = train_tokenizer([work / "corpus.jsonl"], 300, work / "tok", progress=False)
    prepare([work / "corpus.jsonl"], tok, work / "data", val_fraction=0.05, progress=False)
    settings = ["model=tiny" if quick else "model=bench", "model.vocab_size=320", "seq_len=64", "batch_size=8",
                "lr=3e-3", "warmup_steps=2", "eval_every=0", "save_every=10", "sample_prompt=", "tensorboard=false",
                f"device={device.type}", f"data={work / 'data'}", f"out_dir={work / 'run'}"]
    t0 = time.perf_counter()
    first = run_pretraining(load_train_config(PretrainConfig, None, [*settings, "max_steps=30"]))
    seconds = time.perf_counter() - t0
    resumed = run_pretraining(load_train_config(PretrainConfig, None, [*settings, "max_steps=40"]), resume=True)
    losses = [r["loss"] for r in first.history]
    return {"first_loss": losses[0], "loss_at_30": losses[-1], "seconds_30_steps": seconds,
            "tokens_per_s_last": first.history[-1]["tokens_per_s"], "resumed_from": resumed.history[0]["step"] - 1,
            "loss_at_40": resumed.history[-1]["loss"], "world_size": first.parallel.world_size,
            "backend": torch.distributed.get_backend()}


def fsdp_bf16(device: torch.device, quick: bool) -> dict:
    from nanoseek.config import preset
    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.parallel.config import ParallelConfig
    from nanoseek.parallel.fsdp import apply_fsdp, clip_grad_norm
    from nanoseek.parallel.mesh import init_parallel

    ctx = init_parallel(ParallelConfig(), device)  # the 1-rank group of one process
    cfg = preset("tiny" if quick else "bench")
    ids = torch.randint(0, cfg.vocab_size, (4, 128), device=ctx.device)
    results = {}
    for name in ("autocast", "fsdp"):
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM(cfg).to(ctx.device)
        if name == "fsdp":  # the policy FSDP2 uses on GPU: bf16 compute, fp32 gradient reduction
            apply_fsdp(model, ctx, set())
            loss = model(ids, labels=ids).loss
        else:
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
        loss.backward()
        results[name] = (loss.item(), clip_grad_norm(model, 1e30, ctx))
    (la, na), (lf, nf) = results["autocast"], results["fsdp"]
    return {"loss_autocast": la, "loss_fsdp": lf, "loss_rel_diff": abs(la - lf) / abs(la),
            "grad_norm_autocast": na, "grad_norm_fsdp": nf}


def mfu(device: torch.device, quick: bool) -> dict:
    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.train.mfu import peak_flops
    from nanoseek.train.pretrain import train_flops_per_token

    cfg = _moe_config(quick, layers=16)
    seq = 64 if quick else 4096
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (1, seq), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_seconds(step, device, 2 if quick else 5)
    tokens_per_s = seq / seconds
    peak = peak_flops(device, torch.bfloat16)
    flops = train_flops_per_token(cfg, seq)
    out = {"params_total": params, "seq": seq, "step_s": seconds, "tokens_per_s": tokens_per_s,
           "train_flops_per_token": flops, "peak_flops": peak}
    if peak:
        out["mfu"] = tokens_per_s * flops / peak
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


SECTIONS = {"env": env, "fp8_gemm": fp8_gemm, "fp8_linear": fp8_linear, "fp8_speed": fp8_speed,
            "single_gpu": single_gpu, "fsdp_bf16": fsdp_bf16, "mfu": mfu}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the script, not the GPU")
    p.add_argument("--only", default="", help="comma-separated sections (default: all)")
    args = p.parse_args()
    os.environ.setdefault("NANOSEEK_NO_PROGRESS", "1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu --quick for a dry run)", file=sys.stderr)
        return 2
    failed = 0
    for name in [s for s in args.only.split(",") if s] or list(SECTIONS):
        t0 = time.perf_counter()
        try:
            result = SECTIONS[name](device, args.quick)
        except Exception as e:  # one section's failure is a result too; the others still run
            failed += 1
            result = {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()[-1500:]}
        result = {k: (float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v) for k, v in result.items()}
        emit(name, {**result, "seconds": round(time.perf_counter() - t0, 1)})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
