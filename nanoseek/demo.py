"""`nanoseek demo`: the whole DeepSeek-V3 -> R1 pipeline in miniature, on a CPU, with nothing downloaded.

Stages (each cached under runs/demo/<stage>/ and skipped when already finished; `--fresh` starts over):
  data      built-in corpus + worked examples of train-split arithmetic problems, BPE tokenizer, shards
  pretrain  a small V3-style model: MLA + MoE (shared + routed experts, aux-loss-free balancing) + MTP
  before    held-out accuracy of the base model (greedy, pass@1 / maj@k over samples)
  grpo      R1-Zero: GRPO from the base model with rule-based rewards only (accuracy + format), a fixed
            number of steps (no wall-clock limit: a busy machine makes it slower, never different)
  after     held-out accuracy after RL
  r1/*      DeepSeek-R1's stages on the same base model (`nanoseek.r1.pipeline`, the stages of `nanoseek r1`,
            cached under runs/demo/r1/<stage>/): cold-start SFT, reasoning RL, rejection sampling + SFT,
            final RL, distillation into a small dense student, and the held-out evaluation of each model
  report    summary table (base, R1-Zero, R1 and the distilled student side by side: accuracy, response
            length, format and readability), cost table next to DeepSeek-V3, and runs/demo/report.html
Every stage's work is fixed in steps; a stage that ran fewer than planned is flagged in the summary and report.
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

# Sizes: `full` fits the 10-minute budget on a 2-core CPU; `quick` is the smoke test `make test` runs.
# `r1`: the R1 pipeline's settings (R1Config) on top of the task and sampling settings shared with R1-Zero.
PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(n_task_docs=12_000, n_corpus_docs=4_000, vocab=512, seq_len=128, batch_size=16,
                 pretrain_steps=1000, model="tiny",
                 model_overrides={"vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4,
                                  "intermediate_size": 256, "moe_intermediate_size": 64},
                 grpo_steps=200, group_size=8, prompts_per_step=16, max_new_tokens=40,
                 eval_every=25, n_test=200, eval_k=4,
                 # R1's rejection sampling and distillation draw from the first 1,000 training problems (k = 2:
                 # a problem's correct samples are mostly the same trace, so more samples add few distinct ones)
                 r1=dict(n_train=1000, cold_start_examples=200, cold_start_epochs=3, rl_steps=40,
                         final_rl_steps=20, k=2, sft_epochs=2, student="tiny", distill_epochs=25, distill_lr=3e-3)),
    "quick": dict(n_task_docs=600, n_corpus_docs=300, vocab=320, seq_len=64, batch_size=8,
                  pretrain_steps=30, model="tiny", model_overrides={"vocab_size": 320},
                  grpo_steps=4, group_size=4, prompts_per_step=4, max_new_tokens=20,
                  eval_every=2, n_test=16, eval_k=2,
                  # a 30-step base knows nothing: the SFT stage memorizes the 8 cold-start problems (high lr, many
                  # epochs) so that distillation samples some correct traces to train on
                  r1=dict(n_train=8, cold_start_examples=8, cold_start_epochs=10, sft_lr=1e-2, rl_steps=2,
                          final_rl_steps=1, k=4, sft_epochs=40, student="tiny", distill_epochs=2)),
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

    def stage(self, name: str, fn: Callable[[Path], dict], current: Callable[[dict], bool] | None = None) -> dict:
        """Run `fn` unless its result is cached; the result file is the stage's completion marker."""
        return self.stages.run(name, fn, current)

    def r1_config(self):
        from nanoseek.r1.pipeline import R1Config

        p = self.p
        return R1Config(model=self.results["pretrain"]["model"], out_dir=str(self.out / "r1"), task=TASK["task"],
                        task_options=TASK["task_options"], task_seed=TASK["task_seed"], n_test=p["n_test"],
                        template="compact", max_new_tokens=p["max_new_tokens"], group_size=p["group_size"],
                        prompts_per_step=p["prompts_per_step"], eval_k=p["eval_k"], eval_base=False, seed=self.seed,
                        **p["r1"])

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
                "config": trainer.model.config.to_dict(), "flops_per_token": trainer.flops_per_token,
                "steps": trainer.step, "planned_steps": p["pretrain_steps"]}

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, model_dir: str) -> Callable[[Path], dict]:
        def run(folder: Path) -> dict:
            from nanoseek.r1.pipeline import held_out_metrics

            metrics = held_out_metrics(model_dir, self.task(), template="compact", k=self.p["eval_k"],
                                       max_new_tokens=self.p["max_new_tokens"], seed=self.seed,
                                       samples_out=folder / "samples.jsonl")
            return {"metrics": metrics, "samples": first_samples(folder / "samples.jsonl")}

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


def has_every_metric(result: dict) -> bool:
    """An evaluation cached by an older demo lacks the readability share and the model size."""
    return {"readable", "params"} <= set(result["metrics"])


def first_samples(path: Path, n: int = 6) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]


# ---------------------------------------------------------------------------------------------- summary
# The side-by-side rows: (summary prefix, label, where the model's held-out metrics are in the results)
MODEL_ROWS = [("base", "base", ("before",)), ("r1_zero", "R1-Zero", ("after",)), ("r1", "R1", ("r1", "final_rl")),
              ("student", "student", ("r1", "distill"))]
MODEL_NOTE = ("R1-Zero: GRPO from the base; R1: cold-start SFT, reasoning RL, rejection sampling + SFT, final RL; "
              "student: a small dense model distilled from R1's traces")
METRICS = [("greedy", "greedy_accuracy"), ("pass1", "pass_at_1"), ("length", "mean_response_length"),
           ("format", "format_rate"), ("readable", "readable"), ("params", "params")]
# Stages whose work is a planned number of steps: (results key, summary prefix, display name)
STEP_STAGES = [(("pretrain",), "pretrain", "pretraining"), (("grpo",), "grpo", "GRPO"),
               *[(("r1", name), f"r1_{name}", f"R1 {name}")
                 for name in ("cold_start", "reasoning_rl", "sft", "final_rl", "distill")]]


def model_metrics(results: dict, where: tuple[str, ...]) -> dict:
    if where[0] == "r1":
        return results["r1"]["eval"]["models"][where[1]]
    return results[where[0]]["metrics"]


def stage_result(results: dict, where: tuple[str, ...]) -> dict:
    return results["r1"][where[1]] if where[0] == "r1" else results[where[0]]


def _last(history: list[dict], key: str) -> float:
    values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
    return values[-1] if values else float("nan")


def _mean_tail(history: list[dict], key: str, frac: float = 0.2) -> float:
    values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
    tail = values[-max(1, int(len(values) * frac)):]
    return sum(tail) / len(tail) if tail else float("nan")


def summary(results: dict) -> dict[str, float]:
    pre, grpo = results["pretrain"]["history"], results["grpo"]["history"]
    s = {
        "pretrain_loss": _last(pre, "loss"), "pretrain_val_loss": _last(pre, "val_loss"),
        "pretrain_mtp_loss": _last(pre, "mtp_loss"), "load_max_mean": _mean_tail(pre, "load_max_mean"),
        "dead_experts": _mean_tail(pre, "dead_experts"), "pretrain_tokens_per_s": _mean_tail(pre, "tokens_per_s"),
        "pretrain_mfu": _mean_tail(pre, "mfu"),
        "grpo_reward_last": _mean_tail(grpo, "reward"),
        "grpo_tokens_per_s": _mean_tail(grpo, "tokens_per_s"),
    }
    for prefix, _, where in MODEL_ROWS:
        m = model_metrics(results, where)
        s.update({f"{prefix}_{short}": float(m[key]) for short, key in METRICS})
    for where, prefix, _ in STEP_STAGES:
        r = stage_result(results, where)
        # a pretraining stage cached by an older demo did not record its steps: its log's last step
        steps = r.get("steps", max((h["step"] for h in r.get("history", [])), default=0))
        s[f"{prefix}_steps"], s[f"{prefix}_planned_steps"] = steps, r.get("planned_steps", steps)
    # every stage's own time (cached ones included): wall clock, process CPU (~ the idle-machine time with one
    # thread) and the 1-minute load average when it ended
    stages = [r for name, r in results.items() if name != "r1"] + list(results["r1"].values())
    s["stages_seconds"] = sum(r["seconds"] for r in stages)
    s["stages_cpu_seconds"] = sum(r.get("cpu_seconds", 0.0) for r in stages)  # 0: cached by an older demo
    return s


def cost_rows(model_config: dict) -> list[dict]:
    from nanoseek.config import ModelConfig
    from nanoseek.cost import summarize

    ours = summarize(ModelConfig.from_dict(model_config), "nanoseek demo model", seq_len=4096)
    return [ours, summarize("deepseek-v3", "deepseek-v3", seq_len=4096)]


def cut_short(s: dict) -> list[str]:
    """One loud line per stage of the summary `s` that did less work than planned (its results are not
    comparable)."""
    from nanoseek.r1.pipeline import cut_short as stages_cut_short

    names = {prefix: name for _, prefix, name in STEP_STAGES}
    prefixes = [key.removesuffix("_planned_steps") for key in s if key.endswith("_planned_steps")]
    stages = {names.get(p, p): {"steps": s[f"{p}_steps"], "planned_steps": s[f"{p}_planned_steps"]} for p in prefixes}
    return [f"{line}, so its results are not the demo's" for line in stages_cut_short(stages)]


def stage_times(results: dict) -> list[list]:
    """[stage, wall s, CPU s, load average at its end] for every stage, in run order."""
    rows = [(name, r) for name, r in results.items() if name != "r1"]
    rows += [(f"r1/{name}", r) for name, r in results["r1"].items()]
    return [[name, round(r["seconds"], 1), round(r["cpu_seconds"], 1) if "cpu_seconds" in r else "not recorded",
             round(r["load_average"], 2) if "load_average" in r else "not recorded"] for name, r in rows]


def diagnostics(results: dict) -> dict[str, list[str]]:
    """GRPO's silent-failure verdicts, by RL stage."""
    return {"R1-Zero GRPO": results["grpo"].get("diagnostics", []),
            **{f"R1 {name}": results["r1"][name].get("diagnostics", []) for name in ("reasoning_rl", "final_rl")}}


def print_summary(s: dict, costs: list[dict], report: Path, diagnostics: dict[str, list[str]] | None = None,
                  times: list[list] = ()) -> None:
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
        ("R1-Zero GRPO reward (last 20%) / rollout tokens/s",
         f"{s['grpo_reward_last']:.2f} / {s['grpo_tokens_per_s']:,.0f}"),
        ("steps run of planned: " + ", ".join(name for _, _, name in STEP_STAGES),
         ", ".join(f"{s[f'{prefix}_steps']}/{s[f'{prefix}_planned_steps']}" for _, prefix, _ in STEP_STAGES)),
        ("time of all stages: wall / CPU (s)", f"{s['stages_seconds']:,.0f} / {s['stages_cpu_seconds']:,.0f}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    m = Table(title="held-out test: R1-Zero, R1 and the distilled student side by side", caption=MODEL_NOTE)
    for col in ("model", "params (all)", "greedy acc", "pass@1", "length (tokens)", "format", "readable"):
        m.add_column(col, justify="left" if col == "model" else "right")
    for prefix, label, _ in MODEL_ROWS:
        m.add_row(label, f"{s[prefix + '_params']:,.0f}", *[f"{s[f'{prefix}_{k}']:.1%}" for k in ("greedy", "pass1")],
                  f"{s[prefix + '_length']:.1f}", *[f"{s[f'{prefix}_{k}']:.1%}" for k in ("format", "readable")])
    console.print(m)
    for line in cut_short(s):
        console.print(f"[bold red]WARNING: {line}[/bold red]")
    for stage, lines in (diagnostics or {}).items():  # the warnings; every verdict is in the report
        warnings = [line for line in lines if not line.startswith("ok")]
        console.print(f"{stage} diagnostics: " + ("all clear" if not warnings else f"{len(warnings)} warning(s)"))
        for line in warnings:
            console.print(f"  {line}")
    c = Table(title="cost accounting (seq 4096, BF16 KV cache)")
    c.add_column("")
    for r in costs:
        c.add_column(r["name"], justify="right")
    for label, key, fmt in COST_FIELDS:
        c.add_row(label, *[fmt(r[key]) for r in costs])
    console.print(c)
    if times:
        console.print("stage times (wall s / CPU s / load average at the end): " +
                      ", ".join(f"{name} {wall:.0f}/{cpu}/{load}" for name, wall, cpu, load in times))
    console.print(f"report: [bold]{report}[/bold]")


COST_FIELDS = [
    ("params total", "params_total", lambda x: f"{x:,.0f}"),
    ("params active", "params_active", lambda x: f"{x:,.0f}"),
    ("KV cache bytes / token", "kv_cache_bytes_per_token", lambda x: f"{x:,.0f}"),
    ("training FLOPs / token", "train_flops_per_token", lambda x: f"{x:,.4g}"),
]


def write_report(out: Path, results: dict, s: dict, costs: list[dict]) -> Path:
    from nanoseek import report as R
    from nanoseek.train.metrics_log import read_metrics

    pre, grpo = results["pretrain"]["history"], results["grpo"]["history"]
    # R1's two RL stages on one axis: the final RL's steps continue the reasoning RL's
    reasoning, final = (read_metrics(out / "r1" / name / "run" / "metrics.jsonl") for name in ("reasoning_rl", "final_rl"))
    offset = max((h["step"] for h in reasoning), default=0)
    r1_rl = reasoning + [{**h, "step": h["step"] + offset} for h in final]
    plots = [R.line_plot(pre, ["loss", "lm_loss", "mtp_loss", "val_loss"], "pretraining loss"),
             R.line_plot(pre, ["load_max_mean"], "expert load max/mean (1 = balanced)"),
             R.load_heatmaps(pre),
             R.line_plot(grpo, ["reward", "accuracy", "format"], "R1-Zero GRPO reward and accuracy (rollouts)"),
             R.line_plot(grpo, ["test_accuracy"], "held-out greedy accuracy during R1-Zero GRPO"),
             R.line_plot(grpo, ["response_length"], "R1-Zero mean response length (tokens)")]
    plots.append(R.line_plot(r1_rl, ["reward", "accuracy", "format", "response_length"],
                             f"R1 reasoning RL (steps 1-{offset}), then final RL: rollouts"))
    plot_html = "<div class='plots'>" + "".join(p for p in plots if p) + "</div>"
    summary_rows = [[k, v] for k, v in s.items()]

    def samples(items: list[dict]) -> str:
        return "".join(f"<p>problem {R.html.escape(str(x.get('problem', '')))}; extracted answer "
                       f"{R.html.escape(str(x.get('answer')))}; correct: {x.get('correct')}</p>"
                       f"{R.completion_html(str(x.get('prompt', '')) + str(x.get('completion', '')))}"
                       for x in items)

    models = [[label] + [model_metrics(results, where)[key] for _, key in METRICS] for _, label, where in MODEL_ROWS]
    models += [[f"R1 stage: {name}"] + [m[key] for _, key in METRICS]
               for name, m in results["r1"]["eval"]["models"].items() if name not in ("base", "final_rl", "distill")]
    side_by_side = f"<p>{R.html.escape(MODEL_NOTE)}</p>" + R.table(
        ["model", "greedy accuracy", "pass@1", "mean response length", "format-valid", "readable",
         "params (all, embeddings and MTP included)"], models)
    cost = R.table([""] + [r["name"] for r in costs],
                   [[label] + [fmt(r[key]) for r in costs] for label, key, fmt in COST_FIELDS])
    warnings = "".join(f"<p><b>WARNING: {R.html.escape(line)}</b></p>" for line in cut_short(s))
    verdicts = "".join(f"<p>{R.html.escape(stage)}: {R.html.escape(line)}</p>"
                       for stage, lines in diagnostics(results).items() for line in lines)
    times = R.table(["stage", "wall s", "CPU s", "load average at its end"], stage_times(results))
    eval_dir = out / "r1" / "eval"
    html = R.render("nanoseek demo report", [
        ("Summary", warnings + R.table(["metric", "value"], summary_rows)),
        ("R1-Zero, R1 and the distilled student (held-out test)", side_by_side),
        ("GRPO diagnostics (silent failures)", verdicts or "<p>not recorded</p>"),
        ("Training curves", plot_html),
        ("Samples before RL", samples(results["before"]["samples"])),
        ("Samples after R1-Zero RL", samples(results["after"]["samples"])),
        ("Samples of R1 (final RL)", samples(first_samples(eval_dir / "final_rl.samples.jsonl"))),
        ("Samples of the distilled student", samples(first_samples(eval_dir / "distill.samples.jsonl"))),
        ("Cost accounting", cost),
        ("Stage times", times),
    ], subtitle=f"{out} - pretraining, R1-Zero, the R1 pipeline, distillation and evaluation on a CPU")
    path = out / "report.html"
    write_text(path, html)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def run_demo(out: Path, quick: bool = False, fresh: bool = False, seed: int = 0) -> dict:
    from nanoseek.r1.pipeline import run_r1

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
    pipe.stage("before", pipe.evaluate(pipe.results["pretrain"]["model"]), current=has_every_metric)
    pipe.stage("grpo", pipe.grpo)
    pipe.stage("after", pipe.evaluate(pipe.results["grpo"]["model"]), current=has_every_metric)
    pipe.results["r1"] = run_r1(pipe.r1_config())
    s = summary(pipe.results)
    costs = cost_rows(pipe.results["pretrain"]["config"])
    report = write_report(out, pipe.results, s, costs)
    s["demo_seconds"] = time.time() - t0
    write_json(out / "summary.json", s, indent=1)
    print_summary(s, costs, report, diagnostics(pipe.results), stage_times(pipe.results))
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
