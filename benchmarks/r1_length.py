"""R1-Zero length growth in miniature: with accuracy + format rewards only, does RL make the model
think longer, and does that pay on hard problems?

1. Task (`chain_sum`): sums of chains of 2..6 one-digit numbers ("Q: 3+5+8+2+7+4"); the held-out
   test split is the *hard* split only (chains of 5-6 numbers, never seen in training).
2. Corpus (`nanoseek.r1.corpus.length_corpus`): worked examples of training problems, one per
   document, in the R1 format, either answered in one go ("<think>3+5+8+2+7+4=29</think>", as
   careless mental arithmetic: wrong `direct_error_rate` of the time, up to 60% on long chains) or
   worked step by step with running sums ("3+5=8, 8+8=16, ..., 25+4=29."), 30% of the time, a
   third of those ending in a self-check ("check: 29-4=25."); plus the synthetic corpus without
   any test result. The base model therefore samples both behaviours, mostly the short one.
3. Pretraining with `run_pretraining` (the `nanoseek pretrain` code path).
4. GRPO with the `r1_zero` rewards (accuracy 1 + format 0.5; no length reward), G = 8, T = 1,
   beta = 0.001, for a fixed number of steps (and a CPU-time cap that is reported if it cuts the run).
5. Held-out hard-split evaluation before and after: greedy accuracy, mean response length (greedy
   and sampled), share of step-by-step traces and of traces with a self-check; curves over steps.

    python benchmarks/r1_length.py --seeds 0 1 2      # per seed ~7 min pretraining + GRPO (1 thread)
    python benchmarks/r1_length.py --quick            # smoke test: seconds

Writes OUT/seed_S/{results.json, grpo/...}, OUT/results.json (all seeds), OUT/results.md and the plot
r1_length.png (into --plot-dir: docs/ by default, OUT with --quick).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

TASK = {"task": "chain_sum", "task_options": {"min_terms": 2, "max_terms": 6, "hard_terms": 5},
        "n_train": 4000, "task_seed": 0}
FULL = dict(n_task_docs=24_000, n_corpus_docs=3_000, vocab=384, seq_len=128, batch_size=16,
            pretrain_steps=2000, model="tiny",
            overrides={"vocab_size": 384, "hidden_size": 128, "num_hidden_layers": 4,
                       "intermediate_size": 256, "moe_intermediate_size": 64},
            grpo_steps=150, grpo_cpu_minutes=12.0, group_size=8, prompts_per_step=16,
            max_new_tokens=64, eval_every=25, n_test=200, lr=5e-5)
QUICK = dict(n_task_docs=300, n_corpus_docs=100, vocab=300, seq_len=64, batch_size=8,
             pretrain_steps=10, model="tiny", overrides={"vocab_size": 320},
             grpo_steps=3, grpo_cpu_minutes=2.0, group_size=4, prompts_per_step=2,
             max_new_tokens=24, eval_every=2, n_test=12, lr=5e-5)
STEPS_MARK = "="  # a running-sum trace has one "=" per step; a one-go answer has exactly one


# ------------------------------------------------------------------------------------------ stages
def load_r1_zero():
    """prepare_data and pretrain are r1_zero's, with this experiment's corpus and eval cadence."""
    spec = importlib.util.spec_from_file_location("r1_zero", Path(__file__).resolve().parent / "r1_zero.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_data(out: Path, p: dict, task, seed: int) -> Path:
    from nanoseek.r1.corpus import length_corpus

    return load_r1_zero().prepare_data(out, p, task, seed, corpus=length_corpus)


def pretrain(out: Path, p: dict, data: Path, seed: int) -> Path:
    return load_r1_zero().pretrain(out, p, data, seed, eval_every=250)


def grpo_config(out: Path, p: dict, base: Path, seed: int, **overrides):
    from nanoseek.r1.configs import GRPOConfig

    kw = dict(model=str(base), init_from=str(base), out_dir=str(out / "grpo"), **TASK,
              n_test=p["n_test"], template="compact", group_size=p["group_size"],
              prompts_per_step=p["prompts_per_step"], max_new_tokens=p["max_new_tokens"],
              temperature=1.0, rewards="r1_zero", beta=0.001, loss="grpo", lr=p["lr"],
              max_steps=p["grpo_steps"], eval_every=p["eval_every"], eval_problems=p["n_test"],
              sample_every=50, show_samples=4, save_every=100, time_limit_min=p["grpo_cpu_minutes"],
              time_limit_cpu=True, track_phrase="check:", tensorboard=False, seed=seed)
    kw.update(overrides)
    return GRPOConfig(**kw)


def evaluate(model_dir: Path, task, p: dict) -> dict:
    """Hard-split metrics: EvalResult fields plus, over the greedy and the sampled completions, the
    mean response length, the share of step-by-step traces (more than one "=" in <think>) and of
    traces with a self-check."""
    import tempfile

    from nanoseek.hf import load_model_and_tokenizer
    from nanoseek.r1.corpus import has_self_check
    from nanoseek.r1.evaluate import evaluate_model
    from nanoseek.r1.rewards import parse_completion

    model, tok = load_model_and_tokenizer(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.jsonl"
        r = evaluate_model(model, tok, task, k=4, template="compact", max_new_tokens=p["max_new_tokens"],
                           n_problems=p["n_test"], seed=0, samples_out=path)
        rows = [json.loads(x) for x in path.read_text().splitlines()]
    out = json.loads(r.to_json())
    for kind in ("greedy", "sample"):
        sel = [x for x in rows if x["kind"] == kind]
        thinks = [parse_completion(x["completion"], True).think or "" for x in sel]
        out[f"{kind}_length"] = sum(x["tokens"] for x in sel) / len(sel)
        out[f"{kind}_steps_share"] = sum(t.count(STEPS_MARK) > 1 for t in thinks) / len(sel)
        out[f"{kind}_check_share"] = sum(has_self_check(t) for t in thinks) / len(sel)
    return out


def run_seed(out: Path, p: dict, seed: int, grpo_threads: int, extra: dict) -> dict:
    from nanoseek.r1.grpo import run_grpo
    from nanoseek.r1.rollout import build_task

    task = build_task(TASK["task"], seed=TASK["task_seed"], n_train=TASK["n_train"], n_test=p["n_test"],
                      options=TASK["task_options"])
    timing = out / "base" / "timing.json"  # kept with the base model, so a cached one still reports its cost
    t0, c0 = time.time(), time.process_time()
    base = pretrain(out, p, prepare_data(out, p, task, seed), seed)
    if not timing.exists():
        timing.write_text(json.dumps({"minutes": (time.time() - t0) / 60,
                                      "cpu_minutes": (time.process_time() - c0) / 60}))
    pre = json.loads(timing.read_text())
    before = evaluate(base, task, p)
    print(f"seed {seed} base: greedy {before['greedy_accuracy']:.3f}, length {before['greedy_length']:.1f}, "
          f"steps {before['greedy_steps_share']:.2f} (pretraining {pre['cpu_minutes']:.1f} CPU min)", flush=True)
    cfg = grpo_config(out, p, base, seed, **extra)
    torch.set_num_threads(grpo_threads)
    t1, c1 = time.time(), time.process_time()
    trainer = run_grpo(cfg)
    grpo = {"steps": trainer.step, "planned_steps": p["grpo_steps"], "minutes": (time.time() - t1) / 60,
            "cpu_minutes": (time.process_time() - c1) / 60, "threads": grpo_threads,
            "cut_short": trainer.step < p["grpo_steps"]}
    if grpo["cut_short"]:
        print(f"WARNING: seed {seed}: GRPO stopped by its {p['grpo_cpu_minutes']} CPU-minute cap after "
              f"{trainer.step} of {p['grpo_steps']} steps", flush=True)
    after = evaluate(Path(cfg.out_dir) / "model", task, p)
    result = {"seed": seed, "before": before, "after": after, "pretrain": pre, "grpo": grpo,
              "gain_points": 100 * (after["greedy_accuracy"] - before["greedy_accuracy"]),
              "length_ratio": after["greedy_length"] / max(before["greedy_length"], 1e-9),
              "sampled_length_ratio": after["sample_length"] / max(before["sample_length"], 1e-9),
              "diagnostics": [f.line() for f in trainer.diagnostics]}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------------------------ report
def markdown(results: list[dict], p: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}%"

    lines = ["| hard split (chains of 5-6 numbers) | seed | base | after GRPO |", "|---|---|---|---|"]
    rows = [("greedy accuracy", "greedy_accuracy", pct), ("pass@1 (avg of 4, T=1)", "pass_at_1", pct),
            ("greedy response length (tokens)", "greedy_length", lambda x: f"{x:.1f}"),
            ("sampled response length (tokens)", "sample_length", lambda x: f"{x:.1f}"),
            ("step-by-step traces (greedy)", "greedy_steps_share", pct),
            ("step-by-step traces (sampled)", "sample_steps_share", pct),
            ("traces with a self-check (sampled)", "sample_check_share", pct),
            ("format rate", "format_rate", pct)]
    for name, key, fmt in rows:
        for r in results:
            lines.append(f"| {name} | {r['seed']} | {fmt(r['before'][key])} | {fmt(r['after'][key])} |")
    lines.append("")
    lines.append("| seed | accuracy gain (points) | greedy length ratio | sampled length ratio | GRPO steps | "
                 "GRPO CPU min | pretraining CPU min |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in results:
        g = r["grpo"]
        cut = " (cut short by the CPU cap)" if g["cut_short"] else ""
        lines.append(f"| {r['seed']} | {r['gain_points']:+.1f} | {r['length_ratio']:.2f}x | "
                     f"{r['sampled_length_ratio']:.2f}x | {g['steps']}/{g['planned_steps']}{cut} | "
                     f"{g['cpu_minutes']:.1f} | {r['pretrain']['cpu_minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def smooth(xs: list[float], window: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x - (xs[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(runs: list[tuple[dict, list[dict]]], path: Path) -> bool:
    """Per seed: held-out hard greedy accuracy, response length, self-check / step-by-step shares."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for (result, history), color in zip(runs, colors):
        seed = result["seed"]
        ev = [h for h in history if "test_accuracy" in h]
        axes[0].plot([0] + [h["step"] for h in ev], [result["before"]["greedy_accuracy"]]
                     + [h["test_accuracy"] for h in ev], "o-", ms=2.5, color=color, label=f"seed {seed}")
        steps = [h["step"] for h in history]
        axes[0].plot(steps, smooth([h["accuracy"] for h in history]), lw=0.8, ls=":", color=color)
        axes[1].plot([0] + [h["step"] for h in ev], [result["before"]["greedy_length"]]
                     + [h["test_response_length"] for h in ev], "o-", ms=2.5, color=color)
        axes[1].plot(steps, smooth([h["response_length"] for h in history]), lw=0.8, ls=":", color=color)
        axes[2].plot(steps, smooth([h.get("phrase_share", 0.0) for h in history]), color=color)
    axes[0].set_title("accuracy: held-out hard, greedy (o); rollouts (:)", fontsize=9)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    axes[1].set_title("response length (tokens): held-out hard, greedy (o); rollouts (:)", fontsize=9)
    axes[2].set_title("share of rollout traces with a self-check", fontsize=9)
    axes[2].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/experiments/r1_length")
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps (smoke test)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads for pretraining")
    ap.add_argument("--grpo-threads", type=int, default=1, help="torch threads for GRPO")
    ap.add_argument("--plot-dir", help="where r1_length.png goes (default docs/, or OUT with --quick)")
    ap.add_argument("--report-only", action="store_true",
                    help="only rebuild results.md and the plot from OUT/seed_S/results.json of finished seeds")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value",
                    help="benchmark settings (pretrain_steps=..., grpo_steps=..., lr=...) or GRPO settings")
    args = ap.parse_args(argv)

    import typing

    from nanoseek.r1.configs import GRPOConfig
    from nanoseek.train.config import coerce_setting
    from nanoseek.train.metrics_log import read_metrics

    torch.set_num_threads(args.threads)
    os.environ.setdefault("NANOSEEK_NO_PROGRESS", "1")
    p = dict(QUICK if args.quick else FULL)
    hints = typing.get_type_hints(GRPOConfig)
    extra = {}
    for setting in args.set:
        key, value = setting.split("=", 1)
        if key in p:
            p[key] = type(p[key])(value)
        else:
            extra[key] = coerce_setting(value, hints[key], key)
    out = Path(args.out)
    plot_dir = Path(args.plot_dir) if args.plot_dir else (out if args.quick else Path("docs"))
    results, runs = [], []
    for seed in args.seeds:
        seed_dir = out / f"seed_{seed}"
        if args.report_only:
            result = json.loads((seed_dir / "results.json").read_text())
        else:
            seed_dir.mkdir(parents=True, exist_ok=True)
            torch.set_num_threads(args.threads)
            result = run_seed(seed_dir, p, seed, args.grpo_threads, extra)
        results.append(result)
        runs.append((result, read_metrics(seed_dir / "grpo" / "metrics.jsonl")))
    summary = {"task": TASK, "settings": p, "extra": extra, "seeds": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    md = markdown(results, p)
    (out / "results.md").write_text(md)
    print(md)
    if plot(runs, plot_dir / "r1_length.png"):
        print(f"plot: {plot_dir / 'r1_length.png'}")
    return summary


if __name__ == "__main__":
    main()
