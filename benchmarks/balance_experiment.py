"""Load balancing: auxiliary-loss-free bias (DeepSeek-V3) vs a classic auxiliary loss vs nothing.

Three pretraining runs that differ only in the balancing method -- same synthetic data, tokenizer,
model (the `small` preset with 16 routed experts, top-2, 4 groups / 2 kept), seed, data order and
steps -- then, for each: final validation loss (the whole validation split) and the max/mean expert
load, averaged over the last 20% of steps and over the MoE layers.

    python benchmarks/balance_experiment.py                 # ~6-8 min on one CPU thread
    python benchmarks/balance_experiment.py --quick         # seconds, tiny model (smoke test)

Writes OUT/results.json, OUT/results.md (the table) and the plots `balance.png` (loss and max/mean
load over steps) and `balance_heatmap.png` (per-expert load share over steps) into --plot-dir
(default: docs/, or OUT with --quick). Each run is an ordinary `nanoseek pretrain` run in
OUT/<mode>/ (metrics.jsonl, final model); the equivalent CLI command is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from nanoseek.files import write_json, write_text

MODES = {
    # V3: bias updates (gamma tuned up from V3's 0.001 for a run of a few hundred steps) + the tiny
    # sequence-wise complementary loss
    "aux_free": {"balance": "aux_free", "bias_gamma": 0.01, "aux_alpha": 1e-4},
    # the classic batch-wise auxiliary loss of earlier MoEs (GShard/Switch-style f_i * P_i)
    "aux_loss": {"balance": "aux_loss", "aux_alpha": 0.01},
    "none": {"balance": "none"},
}
COLORS = {"aux_free": "tab:blue", "aux_loss": "tab:orange", "none": "tab:gray"}

FULL = dict(model="small", n_docs=10_000, vocab=1024, seq_len=128, batch_size=8, steps=400, warmup=20,
            eval_every=25, eval_batches=4,
            overrides={"vocab_size": 1024, "n_routed_experts": 16, "num_experts_per_tok": 2, "n_group": 4,
                       "topk_group": 2})
QUICK = dict(model="tiny", n_docs=300, vocab=300, seq_len=32, batch_size=4, steps=10, warmup=2,
             eval_every=5, eval_batches=1, overrides={"vocab_size": 320})


def prepare_data(root: Path, n_docs: int, vocab: int, seed: int) -> Path:
    from nanoseek.data import prepare, synthetic_corpus, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    data = root / "data"
    if (data / "manifest.json").exists():
        return data
    corpus = write_corpus(synthetic_corpus(n_docs, seed=seed), root / "corpus.jsonl")
    tok = train_tokenizer([corpus], vocab, root / "tokenizer", progress=False)
    prepare([corpus], tok, data, val_fraction=0.05, workers=1, progress=False)
    return data


def train_config(p: dict, data: Path, out: Path, mode: str, seed: int, lr: float):
    from nanoseek.train.config import PretrainConfig

    return PretrainConfig(model=p["model"], model_overrides=dict(p["overrides"]), data=str(data),
                       out_dir=str(out / mode), seq_len=p["seq_len"], batch_size=p["batch_size"],
                       max_steps=p["steps"], lr=lr, warmup_steps=p["warmup"], eval_every=p["eval_every"],
                       eval_batches=p["eval_batches"], save_every=0, sample_prompt="", tensorboard=False,
                       seed=seed, **MODES[mode])


def cli_command(cfg) -> str:
    return " ".join(["nanoseek pretrain", *cfg.override_args()])


def summarize(history: list[dict], max_steps: int, tail: float = 0.2) -> dict:
    """Averages over the last `tail` share of steps: per-step max/mean load (mean over MoE layers,
    as the trainer logs it), the same per layer, the max/mean of the load *summed* over that window
    (persistent imbalance, without per-step sampling noise) and the share of dead experts."""
    rows = [r for r in history if r["step"] > (1 - tail) * max_steps and "load_max_mean" in r]
    layers = sorted({int(k.rsplit("layer", 1)[1]) for r in rows for k in r if k.startswith("load/layer")})
    per_layer = {i: sum(r[f"load_max_mean/layer{i}"] for r in rows) / len(rows) for i in layers}
    pooled = []
    for i in layers:
        share = torch.tensor([r[f"load/layer{i}"] for r in rows]).mean(0)
        pooled.append((share.max() / share.mean()).item())
    return {
        "load_max_mean": sum(r["load_max_mean"] for r in rows) / len(rows),
        "load_max_mean_per_layer": per_layer,
        "load_max_mean_pooled": sum(pooled) / len(pooled),
        "dead_experts": sum(r["dead_experts"] for r in rows) / len(rows),
        "train_lm_loss": sum(r["lm_loss"] for r in rows) / len(rows),
        "tail_steps": len(rows),
    }


def markdown_table(results: dict) -> str:
    lines = ["| balancing | final val loss | max/mean load (per step) | max/mean load (pooled) | dead experts "
             "| train LM loss (last 20%) |",
             "|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| `{mode}` | {r['val_loss']:.4f} | {r['load_max_mean']:.3f} | {r['load_max_mean_pooled']:.3f} "
                     f"| {100 * r['dead_experts']:.1f}% | {r['train_lm_loss']:.4f} |")
    layers = list(next(iter(results.values()))["load_max_mean_per_layer"])
    lines += ["", "Per-step max/mean load per MoE layer (last 20% of steps; the last index is the MTP module's "
              "MoE layer):", "",
              "| balancing | " + " | ".join(f"MoE #{i}" for i in layers) + " |",
              "|---|" + "---|" * len(layers)]
    for mode, r in results.items():
        lines.append(f"| `{mode}` | " + " | ".join(f"{v:.3f}" for v in r["load_max_mean_per_layer"].values()) + " |")
    return "\n".join(lines) + "\n"


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(histories: dict, results: dict, plot_dir: Path, max_steps: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, max_steps // 40)
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(17, 4.5))
    for mode, hist in histories.items():
        steps = [r["step"] for r in hist]
        ax1.plot(steps, smooth([r["lm_loss"] for r in hist], window), color=COLORS[mode], alpha=0.6,
                 label=f"{mode} train (smoothed)")
        ev = [(r["step"], r["val_loss"]) for r in hist if "val_loss" in r]
        ax1.plot(*zip(*ev), "o-", color=COLORS[mode], ms=3, label=f"{mode} val (final {results[mode]['val_loss']:.3f})")
        ax2.plot(steps, smooth([r["load_max_mean"] for r in hist], window), color=COLORS[mode],
                 label=f"{mode} (last 20%: {results[mode]['load_max_mean']:.2f})")
    ref = "none" if "none" in histories else next(iter(histories))
    ref_val = {r["step"]: r["val_loss"] for r in histories[ref] if "val_loss" in r}
    for mode, hist in histories.items():
        ev = [(r["step"], r["val_loss"] - ref_val[r["step"]]) for r in hist if "val_loss" in r and r["step"] in ref_val]
        ax3.plot(*zip(*ev), "o-", color=COLORS[mode], ms=3, label=mode)
    ax3.axhline(0.0, color="k", lw=0.5, ls="--")
    ax3.set(xlabel="step", ylabel=f"val loss minus `{ref}` val loss", title="Validation loss difference")
    ax3.legend(fontsize=8)
    ax1.set(xlabel="step", ylabel="next-token loss (nats)", title="LM loss")
    lo = min(min(r["val_loss"] for r in h if "val_loss" in r) for h in histories.values())
    ax1.set_ylim(lo - 0.1, lo + 1.5)
    ax1.legend(fontsize=8)
    ax2.axhline(1.0, color="k", lw=0.5, ls="--")
    ax2.set(xlabel="step", ylabel="max / mean expert load", title="Expert load imbalance (mean over MoE layers)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    plot_dir.mkdir(parents=True, exist_ok=True)
    main = plot_dir / "balance.png"
    fig.savefig(main, dpi=110)
    plt.close(fig)

    # per-expert load share of the first MoE layer over steps
    fig, axes = plt.subplots(1, len(histories), figsize=(4 * len(histories), 3.6), sharey=True)
    for ax, (mode, hist) in zip(axes, histories.items()):
        loads = torch.tensor([r["load/layer0"] for r in hist])  # [steps, experts]
        n = loads.shape[1]
        im = ax.imshow((loads * n).T.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=4, interpolation="nearest",
                       extent=(0.5, len(hist) + 0.5, n - 0.5, -0.5))
        ax.set(title=f"{mode}", xlabel="step")
    axes[0].set_ylabel("expert (first MoE layer)")
    fig.colorbar(im, ax=axes, label="load / mean load")
    heat = plot_dir / "balance_heatmap.png"
    fig.savefig(heat, dpi=110)
    plt.close(fig)
    return [main, heat]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/experiments/balance")
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps (smoke test)")
    ap.add_argument("--steps", type=int, help="training steps per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--plot-dir", help="where balance.png goes (default docs/, or OUT with --quick)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--replot", action="store_true", help="redraw the plots from OUT/results.json and the runs' "
                    "metrics.jsonl, without training")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("NANOSEEK_NO_PROGRESS", "1")
    from nanoseek.train.metrics_log import read_metrics
    from nanoseek.train.pretrain import evaluate_loss, run_pretraining

    p = dict(QUICK if args.quick else FULL)
    if args.steps:
        p["steps"] = args.steps
    out = Path(args.out)
    plot_dir = Path(args.plot_dir) if args.plot_dir else (out if args.quick else Path("docs"))
    if args.replot:
        saved = json.loads((out / "results.json").read_text())
        results = saved["results"]
        histories = {m: read_metrics(out / m / "metrics.jsonl") for m in results}
        print(markdown_table(results))
        print("plots:", ", ".join(map(str, plot(histories, results, plot_dir, saved["params"]["steps"]))))
        return results
    t0 = time.time()
    data = prepare_data(out, p["n_docs"], p["vocab"], 0)  # same corpus whatever --seed (model init + data order)
    print(f"data: {data} ({time.time() - t0:.1f}s)", flush=True)

    results, histories = {}, {}
    for mode in args.modes.split(","):
        cfg = train_config(p, data, out, mode, args.seed, args.lr)
        print(f"\n== {mode}: {cli_command(cfg)}", flush=True)
        shutil.rmtree(cfg.out_dir, ignore_errors=True)  # metrics.jsonl appends: start each run clean
        t = time.time()
        trainer = run_pretraining(cfg)
        hist = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")  # every step (Trainer.history is a window)
        val = evaluate_loss(trainer.model, str(data), p["seq_len"], p["batch_size"], 10**9, trainer.device)
        r = summarize(hist, p["steps"])
        r.update(val_loss=val, seconds=time.time() - t, command=cli_command(cfg))
        results[mode], histories[mode] = r, hist
        print(f"   {mode}: val_loss {val:.4f}, max/mean load {r['load_max_mean']:.3f} (pooled "
              f"{r['load_max_mean_pooled']:.3f}), dead {100 * r['dead_experts']:.1f}%, {r['seconds']:.0f}s", flush=True)

    table = markdown_table(results)
    write_text(out / "results.md", table)
    write_json(out / "results.json", {"params": p, "seed": args.seed, "results": results})
    plots = plot(histories, results, plot_dir, p["steps"])
    print("\n" + table)
    print(f"plots: {', '.join(map(str, plots))}; total {time.time() - t0:.0f}s")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
