"""`nanoseek demo`: the whole DeepSeek-V3 -> R1 pipeline in miniature, on a CPU, with nothing downloaded.

Stages (each cached under runs/demo/<stage>/ and skipped when already finished; `--fresh` starts over):
  data      built-in corpus + worked examples of train-split arithmetic problems, BPE tokenizer, shards
  pretrain  a small V3-style model: MLA + MoE (shared + routed experts, aux-loss-free balancing) + MTP
  before    held-out accuracy of the base model (greedy, pass@1 / maj@k over samples)
  grpo      R1-Zero: GRPO from the base model with rule-based rewards only (accuracy + format), a fixed
            number of steps (no wall-clock limit: a busy machine makes it slower, never different)
  after     held-out accuracy after RL
  report    summary table, cost table next to DeepSeek-V3, and runs/demo/report.html
A stage's result is written atomically when it ends, so Ctrl-C never leaves a half-finished stage
marked done; the training stages resume from their last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from nanoseek.errors import UserError, require
from nanoseek.files import write_json, write_text
from nanoseek.stages import Stages

# Sizes: `full` fits the 10-minute budget on a 2-core CPU; `quick` is the < 2 minute smoke test.
PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(n_task_docs=12_000, n_corpus_docs=4_000, vocab=512, seq_len=128, batch_size=16,
                 pretrain_steps=1000, model="tiny",
                 model_overrides={"vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4,
                                  "intermediate_size": 256, "moe_intermediate_size": 64},
                 grpo_steps=300, group_size=8, prompts_per_step=16, max_new_tokens=40,
                 eval_every=25, n_test=200, eval_k=4),
    "quick": dict(n_task_docs=600, n_corpus_docs=300, vocab=320, seq_len=64, batch_size=8,
                  pretrain_steps=30, model="tiny", model_overrides={"vocab_size": 320},
                  grpo_steps=4, group_size=4, prompts_per_step=4, max_new_tokens=12,
                  eval_every=2, n_test=24, eval_k=2),
}
TASK = dict(task="arithmetic", task_options={"n_operands": 2, "max_value": 99, "ops": "+"}, task_seed=0,
            n_train=2000)


# ---------------------------------------------------------------------------------------------- stages
def interrupted(folder: Path) -> bool:
    """A training stage that was stopped part-way has checkpoints: it resumes from them."""
    from nanoseek.train.checkpoint import list_checkpoints

    return bool(list_checkpoints(folder / "checkpoints"))


class Pipeline:
    def __init__(self, out: Path, profile: dict[str, Any], seed: int):
        self.out, self.p, self.seed = out, profile, seed
        self.stages = Stages(out)
        self.results: dict[str, Any] = self.stages.results

    def stage(self, name: str, fn: Callable[[Path], dict]) -> dict:
        """Run `fn` unless its result is cached; the result file is the stage's completion marker."""
        return self.stages.run(name, fn)

    def task(self):
        from nanoseek.r1.rollout import build_task

        return build_task(TASK["task"], seed=TASK["task_seed"], n_train=TASK["n_train"], n_test=self.p["n_test"],
                          options=TASK["task_options"])

    # -- data ---------------------------------------------------------------------------------------
    def data(self, folder: Path) -> dict:
        from nanoseek.data import prepare, write_corpus
        from nanoseek.r1.corpus import pretraining_corpus
        from nanoseek.data.tokenizer import train_tokenizer

        docs = pretraining_corpus(self.task(), self.p["n_task_docs"], self.p["n_corpus_docs"], self.seed)
        corpus = write_corpus(docs, folder / "corpus.jsonl")
        tok = train_tokenizer([corpus], self.p["vocab"], folder / "tokenizer", progress=False)
        manifest = prepare([corpus], tok, folder / "shards", val_fraction=0.02, workers=1, progress=True)
        splits = manifest["splits"]
        return {"docs": len(docs), "vocab": tok.vocab_size, "train_tokens": splits["train"]["num_tokens"],
                "val_tokens": splits["val"]["num_tokens"]}

    # -- pretraining ----------------------------------------------------------------------------------
    def pretrain(self, folder: Path) -> dict:
        from nanoseek.train.config import PretrainConfig
        from nanoseek.train.metrics_log import read_metrics
        from nanoseek.train.pretrain import run_pretraining

        p = self.p
        cfg = PretrainConfig(model=p["model"], model_overrides=p["model_overrides"], data=str(self.out / "data" / "shards"),
                          out_dir=str(folder), seq_len=p["seq_len"], batch_size=p["batch_size"],
                          max_steps=p["pretrain_steps"], lr=3e-3, warmup_steps=min(50, p["pretrain_steps"] // 5),
                          eval_every=max(1, p["pretrain_steps"] // 8), save_every=max(1, p["pretrain_steps"] // 4),
                          bias_gamma=0.01, balance="aux_free", sample_prompt="Q: 12+7\n<think>", tensorboard=False,
                          seed=self.seed)
        trainer = run_pretraining(cfg, resume=interrupted(folder))
        # the whole metrics log (Trainer.history is a bounded window and misses steps before a resume)
        return {"history": read_metrics(folder / "metrics.jsonl"), "model": str(folder / "model"),
                "config": trainer.model.config.to_dict(), "flops_per_token": trainer.flops_per_token}

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, model_dir: str) -> Callable[[Path], dict]:
        def run(folder: Path) -> dict:
            from nanoseek.r1.evaluate import evaluate_model
            from nanoseek.hf import load_model_and_tokenizer

            model, tok = load_model_and_tokenizer(model_dir)
            result = evaluate_model(model, tok, self.task(), k=self.p["eval_k"], template="compact",
                                    max_new_tokens=self.p["max_new_tokens"], seed=self.seed,
                                    samples_out=folder / "samples.jsonl")
            samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()[:6]]
            return {"metrics": json.loads(result.to_json()), "samples": samples}

        return run

    # -- GRPO -----------------------------------------------------------------------------------------
    def grpo(self, folder: Path) -> dict:
        from nanoseek.r1.configs import GRPOConfig
        from nanoseek.r1.grpo import run_grpo
        from nanoseek.train.metrics_log import read_metrics

        p, base = self.p, self.results["pretrain"]["model"]
        cfg = GRPOConfig(model=base, init_from=base, out_dir=str(folder), **TASK, n_test=p["n_test"],
                         template="compact", group_size=p["group_size"], prompts_per_step=p["prompts_per_step"],
                         max_new_tokens=p["max_new_tokens"], temperature=1.0, rewards="r1_zero", beta=0.001,
                         loss="grpo", lr=5e-5, max_steps=p["grpo_steps"], eval_every=p["eval_every"],
                         eval_problems=min(100, p["n_test"]), sample_every=max(1, p["grpo_steps"] // 4),
                         show_samples=0, save_every=max(1, p["grpo_steps"] // 4),
                         tensorboard=False, seed=self.seed)
        trainer = run_grpo(cfg, resume=interrupted(folder))
        history = read_metrics(folder / "metrics.jsonl")
        return {"history": [{k: v for k, v in h.items() if not isinstance(v, (list, dict))} for h in history],
                "model": str(folder / "model"), "steps": trainer.step, "planned_steps": p["grpo_steps"],
                "diagnostics": [f.line() for f in trainer.diagnostics]}


# ---------------------------------------------------------------------------------------------- summary
def _last(history: list[dict], key: str) -> float:
    values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
    return values[-1] if values else float("nan")


def _mean_tail(history: list[dict], key: str, frac: float = 0.2) -> float:
    values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
    tail = values[-max(1, int(len(values) * frac)):]
    return sum(tail) / len(tail) if tail else float("nan")


def summary(results: dict) -> dict[str, float]:
    pre, grpo = results["pretrain"]["history"], results["grpo"]["history"]
    before, after = results["before"]["metrics"], results["after"]["metrics"]
    return {
        "pretrain_loss": _last(pre, "loss"), "pretrain_val_loss": _last(pre, "val_loss"),
        "pretrain_mtp_loss": _last(pre, "mtp_loss"), "load_max_mean": _mean_tail(pre, "load_max_mean"),
        "dead_experts": _mean_tail(pre, "dead_experts"), "pretrain_tokens_per_s": _mean_tail(pre, "tokens_per_s"),
        "pretrain_mfu": _mean_tail(pre, "mfu"),
        "accuracy_before": before["greedy_accuracy"], "accuracy_after": after["greedy_accuracy"],
        "pass1_before": before["pass_at_1"], "pass1_after": after["pass_at_1"],
        "format_before": before["format_rate"], "format_after": after["format_rate"],
        "length_before": before["mean_response_length"], "length_after": after["mean_response_length"],
        "grpo_steps": results["grpo"]["steps"],
        "grpo_planned_steps": results["grpo"].get("planned_steps", results["grpo"]["steps"]),
        "grpo_reward_last": _mean_tail(grpo, "reward"),
        "grpo_tokens_per_s": _mean_tail(grpo, "tokens_per_s"),
    }


def cost_rows(model_config: dict) -> list[dict]:
    from nanoseek.config import ModelConfig
    from nanoseek.cost import summarize

    ours = summarize(ModelConfig.from_dict(model_config), "nanoseek demo model", seq_len=4096)
    return [ours, summarize("deepseek-v3", "deepseek-v3", seq_len=4096)]


def cut_short(s: dict) -> list[str]:
    """One loud line per stage that did less work than planned (its results are not comparable)."""
    if s["grpo_steps"] < s["grpo_planned_steps"]:
        return [f"the GRPO stage was cut short: {s['grpo_steps']} of {s['grpo_planned_steps']} steps ran, so "
                "the accuracy after RL is not the demo's result"]
    return []


def print_summary(s: dict, costs: list[dict], report: Path, diagnostics: list[str] = ()) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="nanoseek demo: DeepSeek-V3 -> R1 in miniature")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("pretrain loss / val loss / MTP loss", f"{s['pretrain_loss']:.3f} / {s['pretrain_val_loss']:.3f} / "
                                                f"{s['pretrain_mtp_loss']:.3f}"),
        ("expert load max/mean (last 20%) / dead experts", f"{s['load_max_mean']:.2f} / {s['dead_experts']:.1%}"),
        ("pretrain tokens/s / MFU", f"{s['pretrain_tokens_per_s']:,.0f} / {s['pretrain_mfu']:.2%}"),
        ("held-out greedy accuracy before -> after GRPO", f"{s['accuracy_before']:.1%} -> {s['accuracy_after']:.1%}"),
        ("pass@1 (sampled) before -> after", f"{s['pass1_before']:.1%} -> {s['pass1_after']:.1%}"),
        ("format rate before -> after", f"{s['format_before']:.1%} -> {s['format_after']:.1%}"),
        ("response length before -> after (tokens)", f"{s['length_before']:.1f} -> {s['length_after']:.1f}"),
        ("GRPO steps (of planned) / rollout tokens/s",
         f"{s['grpo_steps']} of {s['grpo_planned_steps']} / {s['grpo_tokens_per_s']:,.0f}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    for line in cut_short(s):
        console.print(f"[bold red]WARNING: {line}[/bold red]")
    for line in diagnostics:
        console.print(f"GRPO diagnostics: {line}")
    c = Table(title="cost accounting (seq 4096, BF16 KV cache)")
    c.add_column("")
    for r in costs:
        c.add_column(r["name"], justify="right")
    for label, key, fmt in COST_FIELDS:
        c.add_row(label, *[fmt(r[key]) for r in costs])
    console.print(c)
    console.print(f"report: [bold]{report}[/bold]")


COST_FIELDS = [
    ("params total", "params_total", lambda x: f"{x:,.0f}"),
    ("params active", "params_active", lambda x: f"{x:,.0f}"),
    ("KV cache bytes / token", "kv_cache_bytes_per_token", lambda x: f"{x:,.0f}"),
    ("training FLOPs / token", "train_flops_per_token", lambda x: f"{x:,.4g}"),
]


def write_report(out: Path, results: dict, s: dict, costs: list[dict]) -> Path:
    from nanoseek import report as R

    pre, grpo = results["pretrain"]["history"], results["grpo"]["history"]
    plots = [R.line_plot(pre, ["loss", "lm_loss", "mtp_loss", "val_loss"], "pretraining loss"),
             R.line_plot(pre, ["load_max_mean"], "expert load max/mean (1 = balanced)"),
             R.load_heatmaps(pre),
             R.line_plot(grpo, ["reward", "accuracy", "format"], "GRPO reward and accuracy (rollouts)"),
             R.line_plot(grpo, ["test_accuracy"], "held-out greedy accuracy during GRPO"),
             R.line_plot(grpo, ["response_length"], "mean response length (tokens)")]
    plot_html = "<div class='plots'>" + "".join(p for p in plots if p) + "</div>"
    summary_rows = [[k, v] for k, v in s.items()]

    def samples(stage: str) -> str:
        items = results[stage]["samples"]
        return "".join(f"<p>problem {R.html.escape(str(x.get('problem', '')))}; extracted answer "
                       f"{R.html.escape(str(x.get('answer')))}; correct: {x.get('correct')}</p>"
                       f"{R.completion_html(str(x.get('prompt', '')) + str(x.get('completion', '')))}"
                       for x in items)

    cost = R.table([""] + [r["name"] for r in costs],
                   [[label] + [fmt(r[key]) for r in costs] for label, key, fmt in COST_FIELDS])
    warnings = "".join(f"<p><b>WARNING: {R.html.escape(line)}</b></p>" for line in cut_short(s))
    diagnostics = "".join(f"<p>{R.html.escape(line)}</p>" for line in results["grpo"].get("diagnostics", []))
    html = R.render("nanoseek demo report", [
        ("Summary", warnings + R.table(["metric", "value"], summary_rows)),
        ("GRPO diagnostics (silent failures)", diagnostics or "<p>not recorded</p>"),
        ("Training curves", plot_html),
        ("Samples before RL", samples("before")),
        ("Samples after RL", samples("after")),
        ("Cost accounting", cost),
    ], subtitle=f"{out} - pretraining, R1-Zero GRPO and evaluation on a CPU")
    path = out / "report.html"
    write_text(path, html)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def run_demo(out: Path, quick: bool = False, fresh: bool = False, seed: int = 0) -> dict:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    require(0 <= seed < 2**32, "--seed", seed, "in [0, 2**32)")
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(out, PROFILES["quick" if quick else "full"], seed)
    t0 = time.time()
    pipe.stage("data", pipe.data)
    pipe.stage("pretrain", pipe.pretrain)
    pipe.stage("before", pipe.evaluate(pipe.results["pretrain"]["model"]))
    pipe.stage("grpo", pipe.grpo)
    pipe.stage("after", pipe.evaluate(pipe.results["grpo"]["model"]))
    s = summary(pipe.results)
    costs = cost_rows(pipe.results["pretrain"]["config"])
    report = write_report(out, pipe.results, s, costs)
    s["demo_seconds"] = time.time() - t0
    write_json(out / "summary.json", s, indent=1)
    print_summary(s, costs, report, pipe.results["grpo"].get("diagnostics", []))
    return {"summary": s, "report": str(report)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, < 2 minutes (the smoke test)")
    p.add_argument("--fresh", action="store_true", help="delete the run directory and start over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1; 0 = torch's default, all cores). The demo's models are tiny: "
                        "one thread is about as fast, and next to another CPU-bound process two OpenMP threads "
                        "stall on every op (measured: --quick 222 s with 2 threads vs 23 s with 1)")


def run(args: argparse.Namespace) -> int:
    require(args.threads >= 0, "--threads", args.threads, ">= 0 (0 = torch's default)")
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.quick and args.out == "runs/demo":
        out = Path("runs/demo-quick")
    try:
        run_demo(out, quick=args.quick, fresh=args.fresh, seed=args.seed)
    finally:  # called in-process (tests, notebooks): leave the caller's setting as it was
        torch.set_num_threads(threads)
    return 0
