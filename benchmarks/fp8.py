"""FP8 training experiments (results in docs/fp8.md).

    python benchmarks/fp8.py error   [--out DIR]   # (b) GEMM output error: per-tensor / per-row / 1x128+128x128
    python benchmarks/fp8.py memory  [--out DIR]   # (c) activation memory saved for backward, with/without FP8
    python benchmarks/fp8.py speed   [--out DIR]   # (d) CPU step and GEMM time, FP8 vs BF16 vs FP32
    python benchmarks/fp8.py loss    [--out DIR] [--steps 400] [--preset tiny] [--runs bf16,fp8,...]
                                     [--work DIR] [--name loss]   # (a) FP8 vs BF16 training
      runs: bf16, fp8, fp8_bf16_moments, bf16_bf16_moments, fp32, each optionally + _seed<k>; finished runs in
      --work are read back, not repeated

Everything runs on one CPU thread (set before torch starts its pool) with fixed seeds; each command
writes DIR/fp8_<command>.json and, when matplotlib is installed, a plot next to it. DIR defaults to docs/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

torch.set_num_threads(1)

from nanoseek.fp8 import FP8, FP8_MAX, fp8_model_build  # noqa: E402
from nanoseek.fp8.gemm import scaled_gemm  # noqa: E402
from nanoseek.fp8.quantize import block_scales_per_row, quantize_blocks, quantize_tiles  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def save(out: Path, name: str, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fp8_{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def plt_or_none():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------- (b) error
def _fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def gemm_per_tensor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T with one scale per operand (torch._scaled_mm's TensorWise mode)."""
    sa, sb = a.abs().max() / FP8_MAX, b.abs().max() / FP8_MAX
    return torch._scaled_mm(_fp8(a, sa), _fp8(b, sb).t(), scale_a=sa.reshape(()), scale_b=sb.reshape(()),
                            out_dtype=torch.float32)


def gemm_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T with one scale per row of each operand over all of K (RowWise mode)."""
    sa = a.abs().amax(1, keepdim=True) / FP8_MAX
    sb = b.abs().amax(1, keepdim=True) / FP8_MAX
    return torch._scaled_mm(_fp8(a, sa), _fp8(b, sb).t(), scale_a=sa, scale_b=sb.t().contiguous(),
                            out_dtype=torch.float32)


def gemm_fine(a: torch.Tensor, b: torch.Tensor, b_blocks: bool) -> torch.Tensor:
    """V3: a in 1 x 128 tiles; b in 128 x 128 blocks (a weight) or also in 1 x 128 tiles (Wgrad)."""
    aq, as_ = quantize_tiles(a)
    if b_blocks:
        bq, bs = quantize_blocks(b)
        bs = block_scales_per_row(bs, b.shape[0])
    else:
        bq, bs = quantize_tiles(b)
    return scaled_gemm(aq, as_, bq, bs)


def gemm_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.bfloat16() @ b.bfloat16().t()).float()


def dequantised(x: torch.Tensor, scheme: str, weight: bool) -> torch.Tensor:
    """x after FP8 quantisation under `scheme`, in float64 (what the FP8 GEMM multiplies)."""
    if scheme == "per_tensor":
        s = x.abs().max() / FP8_MAX
    elif scheme == "per_row":
        s = x.abs().amax(1, keepdim=True) / FP8_MAX
    else:
        q, s = quantize_blocks(x) if weight else quantize_tiles(x)
        s = (block_scales_per_row(s, x.shape[0]) if weight else s).repeat_interleave(128, 1)[:, :x.shape[1]]
        return q.double() * s.double()
    return _fp8(x, s).double() * s.double()


def bulk_error(a: torch.Tensor, b: torch.Tensor, b_weight: bool, x_is_b: bool, outlier: torch.Tensor) -> dict:
    """The error on the part of the product that comes from the ordinary (non-outlier) activations:
    the outliers set the scales, and the question is what is left of everything else."""
    x_t = outlier.t() if x_is_b else outlier
    keep = (~x_t).double()
    out = {}
    for scheme in ("per_tensor", "per_row", "fine_1x128_128x128"):
        da, db = dequantised(a, scheme, False), dequantised(b, scheme, b_weight)
        if x_is_b:
            got, exact = da @ (db * keep).t(), a.double() @ (b.double() * keep).t()
        else:
            got, exact = (da * keep) @ db.t(), (a.double() * keep) @ b.double().t()
        out[f"{scheme}_bulk"] = ((got - exact).norm() / exact.norm()).item()
    return out


def inject_outliers(x: torch.Tensor, kind: str, factor: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation outliers as LLMs have them: a few channels (all tokens) or scattered single values.
    Returns x and the mask of the outlier entries."""
    x, mask = x.clone(), torch.zeros(x.shape, dtype=torch.bool)
    if kind == "channels":  # 4 outlier channels
        mask[:, torch.randperm(x.shape[1], generator=g)[:4]] = True
    elif kind == "values":  # 0.1% of the entries
        mask = torch.rand(x.shape, generator=g) < 1e-3
    x[mask] *= factor
    return x, mask


def gemm_error(M: int = 512, K: int = 1024, N: int = 1024) -> dict:
    """Relative error (Frobenius, against float64 of the unquantised operands) of the three GEMMs of a
    linear layer y = x W^T under each scaling, with activation outliers of growing size."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g) * K ** -0.5
    dy = torch.randn(M, N, generator=g) * 1e-3  # gradients are small: scaling must follow them
    rows = []
    for kind, factors in (("none", [1]), ("channels", [10, 100, 1000, 10000, 100000]),
                          ("values", [10, 100, 1000, 10000, 100000])):
        for factor in factors:
            x, outlier = inject_outliers(torch.randn(M, K, generator=g), kind, factor, g)
            # gemm -> (a, b, whether b is a weight in 128 x 128 blocks) for out = a @ b.T
            gemms = {"fprop": (x, W, True), "dgrad": (dy, W.t().contiguous(), True),
                     "wgrad": (dy.t().contiguous(), x.t().contiguous(), False)}
            for gemm, (a, b, b_weight) in gemms.items():
                exact = a.double() @ b.double().t()
                norm = exact.norm()
                row = {"outliers": kind, "factor": factor, "gemm": gemm}
                for scheme, fn in (("bf16", gemm_bf16), ("per_tensor", gemm_per_tensor), ("per_row", gemm_per_row),
                                   ("fine_1x128_128x128", lambda a, b: gemm_fine(a, b, b_weight))):
                    out = fn(a, b)
                    row[scheme] = ((out.double() - exact).norm() / norm).item()
                if kind != "none" and gemm != "dgrad":
                    row.update(bulk_error(a, b, b_weight, x_is_b=gemm == "wgrad", outlier=outlier))
                rows.append(row)
                print(json.dumps(row))
    # How much of a tile is lost to underflow: the share of non-outlier activations that become 0 in FP8
    under = []
    for factor in (1, 10, 100, 1000, 10000, 100000):
        x, outlier = inject_outliers(torch.randn(M, K, generator=g), "values", factor, g)
        normal = ~outlier
        zero = {"per_tensor": _fp8(x, x.abs().max() / FP8_MAX).float() == 0,
                "per_row": _fp8(x, x.abs().amax(1, keepdim=True) / FP8_MAX).float() == 0,
                "fine_1x128": quantize_tiles(x)[0].float() == 0}
        under.append({"factor": factor, **{k: (z & normal & (x != 0)).float().mean().item() for k, z in zero.items()}})
        print(json.dumps(under[-1]))
    return {"shape": {"M": M, "K": K, "N": N}, "rows": rows, "underflow": under}


def plot_error(result: dict, out: Path) -> None:
    plt = plt_or_none()
    if plt is None:
        return
    schemes = ("per_tensor", "per_row", "fine_1x128_128x128")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, gemm in zip(axes, ("fprop", "wgrad")):
        for kind, style in (("values", "-"), ("channels", "--")):
            rows = [r for r in result["rows"] if r["gemm"] == gemm and r["outliers"] == kind]
            for i, scheme in enumerate(schemes):
                ax.plot([r["factor"] for r in rows], [r[f"{scheme}_bulk"] for r in rows], style, color=f"C{i}",
                        marker="o", label=f"{scheme}, {kind}")
        bf16 = [r["bf16"] for r in result["rows"] if r["gemm"] == gemm]
        ax.axhline(sum(bf16) / len(bf16), color="k", lw=0.7, label="bf16 GEMM")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("outlier factor")
        ax.set_title(f"{gemm}: error on the ordinary activations' share")
    axes[0].set_ylabel("relative error vs float64")
    axes[0].legend(fontsize=6)
    under = result["underflow"]
    for i, scheme in enumerate(("per_tensor", "per_row", "fine_1x128")):
        axes[2].plot([u["factor"] for u in under], [max(u[scheme], 1e-7) for u in under], marker="o", color=f"C{i}",
                     label=scheme)
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("outlier factor (0.1% of values)")
    axes[2].set_title("ordinary activations flushed to 0")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fp8_error.png", dpi=110)
    print(f"wrote {out / 'fp8_error.png'}")


# ---------------------------------------------------------------------------------------------- (c) memory
def saved_bytes(model, batch, autocast: torch.dtype | None) -> int:
    """Bytes of the tensors autograd keeps for backward after one forward: each storage once, model
    parameters excluded (they exist anyway), and only what is still held when the forward is done
    (a branch of the graph that was dropped, and its address reused, does not count)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, weakref.ref]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = (storage.nbytes(), weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(batch, labels=batch).loss
        held = sum(nbytes for nbytes, ref in seen.values() if ref() is not None)
    del loss
    return held


def memory(preset_name: str = "small", batch: int = 4, seq: int = 256) -> dict:
    from nanoseek.config import preset
    from nanoseek.model import DeepseekV3ForCausalLM

    cfg = preset(preset_name)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    result = {"preset": preset_name, "tokens": batch * seq}
    for name, fp8, autocast in (("fp32", False, None), ("bf16", False, torch.bfloat16), ("fp8", True, torch.bfloat16)):
        torch.manual_seed(0)
        with fp8_model_build(fp8):
            model = DeepseekV3ForCausalLM(cfg)
        result[name] = saved_bytes(model, x, autocast)
        print(f"{name}: {result[name] / 2**20:.1f} MiB saved for backward ({result[name] / (batch * seq):.0f} B/token)")
    # one projection alone under BF16 autocast: what nn.Linear and the FP8 linear keep for backward
    layer_in = torch.randn(batch * seq, cfg.hidden_size, requires_grad=True)
    for name, fp8 in (("linear_bf16", False), ("linear_fp8", True)):
        with fp8_model_build(fp8):
            from nanoseek.model.linear import linear
            layer = linear(cfg.hidden_size, cfg.intermediate_size)
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                layer(layer_in)
        weight = layer.weight.untyped_storage().data_ptr()
        result[name] = [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                         "bytes": t.numel() * t.element_size()} for t in seen
                        if t.untyped_storage().data_ptr() != weight]
        print(name, result[name])
    return result


# ---------------------------------------------------------------------------------------------- (d) speed
def _time(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up (the median resists the shared machine's noise)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def speed(preset_name: str = "small", batch: int = 4, seq: int = 128, steps: int = 5) -> dict:
    from nanoseek.config import preset
    from nanoseek.model import DeepseekV3ForCausalLM

    result: dict = {"gemm": {}, "step": {}, "threads": torch.get_num_threads()}
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        ab, bb = a.bfloat16(), b.bfloat16()

        def fine(a, b):  # what an FP8 linear does per call: quantise both, then the GEMM
            bq, bs = quantize_blocks(b)
            return scaled_gemm(*quantize_tiles(a), bq, block_scales_per_row(bs, b.shape[0]))

        aq, as_ = quantize_tiles(a)
        bq, bs = quantize_blocks(b)
        bs = block_scales_per_row(bs, n)
        result["gemm"][n] = {
            "fp32_s": _time(lambda: a @ b.t(), 5),
            "bf16_s": _time(lambda: ab @ bb.t(), 5),
            "fp8_gemm_only_s": _time(lambda: scaled_gemm(aq, as_, bq, bs), 5),
            "fp8_with_quantisation_s": _time(lambda: fine(a, b), 5)}
        print(n, result["gemm"][n])
    cfg = preset(preset_name)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    for name, fp8, autocast in (("fp32", False, None), ("bf16", False, torch.bfloat16), ("fp8", True, torch.bfloat16)):
        torch.manual_seed(0)
        with fp8_model_build(fp8):
            model = DeepseekV3ForCausalLM(cfg)

        def step():
            with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
                loss = model(x, labels=x).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        result["step"][name] = _time(step, steps)
        print(f"{preset_name} fwd+bwd {name}: {result['step'][name]:.3f} s")
    result["step"]["preset"], result["step"]["tokens"] = preset_name, batch * seq
    return result


# ---------------------------------------------------------------------------------------------- (a) loss
def prepare_data(root: Path) -> Path:
    from nanoseek.data import prepare, synthetic_corpus, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    data = root / "data"
    if (data / "meta.json").exists() or any(data.glob("*.bin")):
        return data
    corpus = root / "corpus.jsonl"
    write_corpus(synthetic_corpus(20000, seed=0), corpus)
    tok = train_tokenizer([corpus], 512, root / "tok", progress=False)
    prepare([corpus], tok, data, val_fraction=0.02, progress=False)
    return data


def loss_gap(steps: int, preset_name: str, work: Path, runs: list[str]) -> dict:
    from nanoseek.train.config import PretrainConfig
    from nanoseek.train.metrics_log import read_metrics
    from nanoseek.train.pretrain import run_pretraining

    os.environ["NANOSEEK_NO_PROGRESS"] = "1"
    data = prepare_data(work)
    settings = {"bf16": dict(fp8=False), "fp8": dict(fp8=True),
                "fp8_bf16_moments": dict(fp8=True, adam_moments="bfloat16"),
                "bf16_bf16_moments": dict(adam_moments="bfloat16"),
                "fp32": dict(dtype="float32")}  # how far plain BF16 moves the loss, for scale

    def run_settings(name: str) -> dict:
        """`<arm>` or `<arm>_seed<k>`: the arm with another seed (init and data order), for run-to-run noise."""
        arm, _, seed = name.partition("_seed")
        if arm not in settings or (seed and not seed.isdigit()):
            raise SystemExit(f"fp8.py loss: unknown run {name!r}: one of {sorted(settings)}, optionally + _seed<k>")
        return {**settings[arm], "seed": int(seed or 0)}

    result: dict = {"steps": steps, "preset": preset_name, "runs": {}}
    for name in runs:
        out = work / f"run_{name}_{steps}"
        cfg = PretrainConfig(model=preset_name, model_overrides={"vocab_size": 512}, data=str(data), out_dir=str(out),
                             seq_len=128, batch_size=8, max_steps=steps, lr=3e-3, warmup_steps=max(1, steps // 20),
                             eval_every=max(1, steps // 10), eval_batches=4, save_every=0, sample_prompt="",
                             tensorboard=False, **{"dtype": "bfloat16", **run_settings(name)})
        if not (out / "model").exists():  # finished runs are read back, not repeated
            run_pretraining(cfg)
        rows = read_metrics(out / "metrics.jsonl")
        losses = [r["lm_loss"] for r in rows if "lm_loss" in r]
        tail = max(1, len(losses) // 10)
        result["runs"][name] = {"lm_loss": losses, "val": [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r],
                                "final_smoothed": sum(losses[-tail:]) / tail,
                                "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows)}
        print(f"{name}: final smoothed loss {result['runs'][name]['final_smoothed']:.4f} "
              f"(last {tail} steps), val {result['runs'][name]['val'][-1][1]:.4f}")
    runs = result["runs"]
    if "bf16" in runs:
        for name, run in runs.items():
            base = runs[reference(name, runs)]
            run["gap_vs_bf16"] = (run["final_smoothed"] - base["final_smoothed"]) / base["final_smoothed"]
            run["val_gap_vs_bf16"] = (run["val"][-1][1] - base["val"][-1][1]) / base["val"][-1][1]
            print(f"{name}: gap vs bf16 (same seed) {100 * run['gap_vs_bf16']:+.3f}% (train, smoothed), "
                  f"{100 * run['val_gap_vs_bf16']:+.3f}% (val)")
    return result


def reference(name: str, runs: dict) -> str:
    """The BF16 run a run is compared with: the one of its seed (`bf16_seed<k>`) when present, else `bf16`."""
    seed = name.partition("_seed")[2]
    return f"bf16_seed{seed}" if seed and f"bf16_seed{seed}" in runs else "bf16"


def plot_loss(result: dict, out: Path, tag: str = "loss") -> None:
    plt = plt_or_none()
    if plt is None:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    base = result["runs"].get("bf16")
    window = max(1, result["steps"] // 25)
    smooth = lambda v: [sum(v[max(0, i - window + 1):i + 1]) / len(v[max(0, i - window + 1):i + 1])  # noqa: E731
                        for i in range(len(v))]
    runs = result["runs"]
    for name, run in runs.items():
        ax.plot(smooth(run["lm_loss"]), label=name)
        ref = reference(name, runs)
        if base and name != ref:
            ratio = [a / b - 1 for a, b in zip(smooth(run["lm_loss"]), smooth(runs[ref]["lm_loss"]))]
            ax2.plot([100 * r for r in ratio], label=f"{name} vs {ref}", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (moving mean, {window} steps)")
    ax.set_yscale("log")
    ax.legend()
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_xlabel("step")
    ax2.set_ylabel("relative gap, %")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / f"fp8_{tag}.png", dpi=110)
    print(f"wrote {out / f'fp8_{tag}.png'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("error", "memory", "speed", "loss"))
    p.add_argument("--out", default=str(ROOT / "docs"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--runs", default="bf16,fp8,fp8_bf16_moments,bf16_bf16_moments")
    p.add_argument("--name", default="loss", help="loss: results go to DIR/fp8_<name>.json and .png")
    p.add_argument("--work", default="", help="loss: where data and runs go (default: a temporary directory)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.what == "error":
        result = gemm_error()
        save(out, "error", result)
        plot_error(result, out)
    elif args.what == "memory":
        save(out, "memory", memory())
    elif args.what == "speed":
        save(out, "speed", speed())
    else:
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="nanoseek-fp8-"))
        result = loss_gap(args.steps, args.preset, work, args.runs.split(","))
        save(out, args.name, result)
        plot_loss(result, out, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
