"""R1-Zero in miniature: pretrain a small base model on CPU, then GRPO with rule-based rewards only.

1. Data (`nanoseek.r1.corpus`): the synthetic corpus of `nanoseek.data` mixed with worked
   examples of *training-split* problems (two-operand addition, 1..99) in the compact template, as
   text found on the web would show them: `Q: 12+7\\n<think>12+7=19</think><answer>19</answer>`
   (the R1 format, 45%) or the same reasoning followed by "The answer is 19." (55%), one example
   per document or 2-4 run together (no stop after the answer). The base model therefore produces
   the format only sometimes. No test problem appears anywhere: worked examples come from the
   train split only, and synthetic-corpus documents that state a test problem's result
   ("12 + 7 = ...") are dropped.
2. Pretraining: `nanoseek.train.pretrain.run_pretraining` (the `nanoseek pretrain` code path).
3. Held-out greedy accuracy on the test split (>= 200 problems) of the base model.
4. GRPO (`nanoseek.r1.grpo.run_grpo`): accuracy + format rewards (the `r1_zero` preset), G = 8,
   temperature 1, beta = 0.001, for a budget of CPU time; greedy test accuracy every few steps.
5. Held-out accuracy after GRPO; curves of reward, accuracy and response length over the steps.

    python benchmarks/r1_zero.py                  # ~6 min pretraining + 15 CPU-min GRPO (1 thread)
    python benchmarks/r1_zero.py --quick          # smoke test: seconds

Writes OUT/results.json, OUT/results.md, and the plot r1_zero.png into --plot-dir (default docs/,
OUT with --quick). The GRPO run is an ordinary run directory (OUT/grpo: metrics.jsonl, samples.jsonl,
checkpoints, model); the equivalent `nanoseek grpo` command is printed and saved.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import torch

TASK = {"task": "arithmetic", "task_options": {"n_operands": 2, "max_value": 99, "ops": "+"},
        "n_train": 2000, "n_test": 200, "task_seed": 0}
FULL = dict(n_task_docs=12_000, n_corpus_docs=4_000, vocab=512, seq_len=128, batch_size=16,
            pretrain_steps=600, model="tiny",
            overrides={"vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4,
                       "intermediate_size": 256, "moe_intermediate_size": 64},
            grpo_minutes=15.0, grpo_max_steps=2000, group_size=8, prompts_per_step=16,
            max_new_tokens=40, eval_every=20, n_test=200)
QUICK = dict(n_task_docs=400, n_corpus_docs=200, vocab=300, seq_len=64, batch_size=8,
             pretrain_steps=20, model="tiny", overrides={"vocab_size": 320},
             grpo_minutes=0.3, grpo_max_steps=4, group_size=4, prompts_per_step=2,
             max_new_tokens=12, eval_every=2, n_test=20)


# ------------------------------------------------------------------------------------------ data
def prepare_data(out: Path, p: dict, task, seed: int, corpus=None) -> Path:
    """Corpus (default: `pretraining_corpus`; r1_length passes its own) -> tokenizer -> token shards."""
    from nanoseek.data import prepare, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.r1.corpus import pretraining_corpus

    data = out / "data"
    if (data / "manifest.json").exists():
        return data
    docs = (corpus or pretraining_corpus)(task, p["n_task_docs"], p["n_corpus_docs"], seed)
    corpus_file = write_corpus(docs, out / "corpus.jsonl")
    tok = train_tokenizer([corpus_file], p["vocab"], out / "tokenizer", progress=False)
    prepare([corpus_file], tok, data, val_fraction=0.02, workers=1, progress=False)
    return data


# ------------------------------------------------------------------------------------------ stages
def pretrain(out: Path, p: dict, data: Path, seed: int, eval_every: int = 200) -> Path:
    from nanoseek.train.config import PretrainConfig
    from nanoseek.train.pretrain import run_pretraining

    model_dir = out / "base" / "model"
    if (model_dir / "config.json").exists():
        return model_dir
    cfg = PretrainConfig(model=p["model"], model_overrides=p["overrides"], data=str(data),
                      out_dir=str(out / "base"), seq_len=p["seq_len"], batch_size=p["batch_size"],
                      max_steps=p["pretrain_steps"], lr=3e-3, warmup_steps=50, eval_every=eval_every,
                      save_every=eval_every, sample_prompt="", tensorboard=False, seed=seed)
    run_pretraining(cfg)
    return model_dir


def grpo_config(out: Path, p: dict, base: Path, seed: int, **overrides):
    from nanoseek.r1.configs import GRPOConfig

    kw = dict(model=str(base), init_from=str(base), out_dir=str(out / "grpo"), **TASK,
              template="compact", group_size=p["group_size"], prompts_per_step=p["prompts_per_step"],
              max_new_tokens=p["max_new_tokens"], temperature=1.0, rewards="r1_zero", beta=0.001,
              loss="grpo", lr=5e-5, max_steps=p["grpo_max_steps"], eval_every=p["eval_every"],
              eval_problems=p["n_test"], sample_every=50, show_samples=4, save_every=100,
              time_limit_min=p["grpo_minutes"], time_limit_cpu=True, tensorboard=False, seed=seed)
    kw["n_test"] = p["n_test"]
    kw.update(overrides)
    return GRPOConfig(**kw)


def cli_command(cfg) -> str:
    defaults = type(cfg)()
    skip = {"model", "init_from", "task"}
    parts = [f"nanoseek grpo --model {cfg.init_from} --task {cfg.task}"]
    for k, v in cfg.to_dict().items():
        if k not in skip and v != getattr(defaults, k):
            parts.append(f"{k}={json.dumps(v) if isinstance(v, dict) else v}".replace('"', '\\"')
                         if not isinstance(v, dict) else f"{k}='{json.dumps(v)}'")
    return " ".join(parts)


def evaluate(model_dir: Path, task, p: dict) -> dict:
    """EvalResult fields, plus two greedy diagnostics that separate format from arithmetic:
    `greedy_format` (share of well-formed greedy completions) and `greedy_answer_accuracy` (the
    first answer given, in <answer> tags or as "The answer is N", whatever the format)."""
    import tempfile

    from nanoseek.r1.evaluate import evaluate_model
    from nanoseek.hf import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.jsonl"
        r = evaluate_model(model, tok, task, k=4, template="compact",
                           max_new_tokens=p["max_new_tokens"], n_problems=p["n_test"], seed=0,
                           samples_out=samples)
        greedy = [json.loads(x) for x in samples.read_text().splitlines()]
    greedy = [g for g in greedy if g["kind"] == "greedy"]
    out = json.loads(r.to_json())
    out["greedy_format"] = sum(g["well_formed"] for g in greedy) / len(greedy)
    out["greedy_answer_accuracy"] = sum(
        first_answer(g["completion"]) == task.test[g["problem"]].answer for g in greedy) / len(greedy)
    return out


def first_answer(text: str) -> str | None:
    m = re.search(r"<answer>\s*(-?\d+)\s*</answer>|answer is (-?\d+)", text)
    return None if m is None else (m.group(1) or m.group(2))


# ------------------------------------------------------------------------------------------ report
def smooth(xs: list[float], window: int = 25) -> list[float]:
    """Trailing moving average (the per-step rollout statistics are noisy)."""
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x - (xs[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(history: list[dict], before: dict, path: Path) -> bool:
    """Training reward / accuracy / format, held-out greedy accuracy, response length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, color in (("reward", "tab:blue"), ("accuracy", "tab:orange"), ("format", "tab:green")):
        ys = [h[key] for h in history]
        axes[0].plot(steps, ys, lw=0.5, alpha=0.3, color=color)
        axes[0].plot(steps, smooth(ys), lw=1.5, color=color, label=key)
    axes[0].set_title("rollouts on training problems (25-step mean)", fontsize=10)
    axes[0].set_xlabel("GRPO step")
    axes[0].legend(fontsize=8)
    ev = [h for h in history if "test_accuracy" in h]
    axes[1].plot([0] + [h["step"] for h in ev], [before["greedy_accuracy"]] +
                 [h["test_accuracy"] for h in ev], "o-", ms=2.5, label="well formed and correct")
    axes[1].axhline(before["greedy_answer_accuracy"], ls="--", color="gray", lw=1,
                    label="base model, answer correct in any format")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("held-out greedy accuracy (200 problems)", fontsize=10)
    axes[1].set_xlabel("GRPO step")
    axes[1].legend(fontsize=8, loc="lower right")
    lengths = [h["response_length"] for h in history]
    axes[2].plot(steps, lengths, lw=0.5, alpha=0.3, color="tab:purple")
    axes[2].plot(steps, smooth(lengths), lw=1.5, color="tab:purple")
    axes[2].set_title("mean response length (tokens)", fontsize=10)
    axes[2].set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(results: dict) -> str:
    b, a = results["before"], results["after"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    rows = [("greedy accuracy (strict: well formed and correct)", "greedy_accuracy"),
            ("pass@1 (avg of 4 samples, T=1)", "pass_at_1"), ("maj@4", "maj_at_k"),
            ("greedy format rate", "greedy_format"),
            ("greedy answer correct, any format", "greedy_answer_accuracy"),
            ("format rate (greedy + samples)", "format_rate")]
    lines = ["| held-out test (200 problems) | base | after GRPO |", "|---|---|---|"]
    lines += [f"| {name} | {pct(b[k])} | {pct(a[k])} |" for name, k in rows]
    lines.append(f"| mean response length | {b['mean_response_length']:.1f} | "
                 f"{a['mean_response_length']:.1f} |")
    g = results["grpo"]
    lines.append("")
    lines.append(f"GRPO: {g['steps']} steps in {g['cpu_minutes']:.1f} CPU minutes "
                 f"({g['threads']} thread(s), {g['minutes']:.1f} min wall clock); pretraining "
                 f"{results['pretrain_minutes']:.1f} min wall clock.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/experiments/r1_zero")
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps (smoke test)")
    ap.add_argument("--minutes", type=float, help="GRPO budget in CPU minutes (process time)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for pretraining")
    ap.add_argument("--grpo-threads", type=int, default=1,
                    help="torch threads for GRPO (1: CPU minutes = minutes on one core)")
    ap.add_argument("--plot-dir", help="where r1_zero.png goes (default docs/, or OUT with --quick)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value",
                    help="extra GRPO settings, e.g. lr=1e-4 loss=dapo")
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw the plot from OUT/results.json and the run's metrics.jsonl")
    args = ap.parse_args(argv)
    if args.plot_only:
        return replot(Path(args.out), Path(args.plot_dir or "docs"))

    torch.set_num_threads(args.threads)
    os.environ.setdefault("NANOSEEK_NO_PROGRESS", "1")
    import typing

    from nanoseek.r1.configs import GRPOConfig
    from nanoseek.r1.grpo import run_grpo
    from nanoseek.r1.rollout import build_task
    from nanoseek.train.config import coerce_setting

    p = dict(QUICK if args.quick else FULL)
    if args.minutes:
        p["grpo_minutes"] = args.minutes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_dir = Path(args.plot_dir) if args.plot_dir else (out if args.quick else Path("docs"))
    task = build_task(TASK["task"], seed=TASK["task_seed"], n_train=TASK["n_train"],
                      n_test=p["n_test"], options=TASK["task_options"])

    t0 = time.time()
    data = prepare_data(out, p, task, args.seed)
    base = pretrain(out, p, data, args.seed)
    pretrain_minutes = (time.time() - t0) / 60
    print(f"base model: {base} ({pretrain_minutes:.1f} min)", flush=True)
    before = evaluate(base, task, p)
    print(f"base: greedy accuracy {before['greedy_accuracy']:.3f}, format {before['format_rate']:.3f}",
          flush=True)

    hints = typing.get_type_hints(GRPOConfig)
    extra = {k: coerce_setting(v, hints[k], k) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = grpo_config(out, p, base, args.seed, **extra)
    command = cli_command(cfg)
    print(f"GRPO: {command}", flush=True)
    torch.set_num_threads(args.grpo_threads)
    t1, c1 = time.time(), time.process_time()
    trainer = run_grpo(cfg)
    minutes, cpu_minutes = (time.time() - t1) / 60, (time.process_time() - c1) / 60
    after = evaluate(Path(cfg.out_dir) / "model", task, p)
    print(f"after GRPO: greedy accuracy {after['greedy_accuracy']:.3f}, format {after['format_rate']:.3f}",
          flush=True)

    results = {"task": TASK, "before": before, "after": after, "pretrain_minutes": pretrain_minutes,
               "grpo": {"steps": trainer.step, "minutes": minutes, "cpu_minutes": cpu_minutes,
                        "threads": args.grpo_threads, "command": command},
               "gain_points": 100 * (after["greedy_accuracy"] - before["greedy_accuracy"])}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    from nanoseek.train.metrics_log import read_metrics  # every step (Trainer.history is a bounded window)

    plotted = plot(read_metrics(Path(cfg.out_dir) / "metrics.jsonl"), before, plot_dir / "r1_zero.png")
    print(markdown(results))
    if plotted:
        print(f"plot: {plot_dir / 'r1_zero.png'}")
    return results


def replot(out: Path, plot_dir: Path) -> dict:
    from nanoseek.train.metrics_log import read_metrics

    results = json.loads((out / "results.json").read_text())
    run_dir = Path(results["grpo"]["command"].split("out_dir=")[1].split()[0])
    plot(read_metrics(run_dir / "metrics.jsonl"), results["before"], plot_dir / "r1_zero.png")
    print(f"plot: {plot_dir / 'r1_zero.png'}")
    return results


if __name__ == "__main__":
    main()
