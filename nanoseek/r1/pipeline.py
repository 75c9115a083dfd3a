"""`nanoseek r1 --model BASE --task chain_sum [key=value ...]`: DeepSeek-R1's four stages on a base
model, then distillation into a small dense student (DeepSeek-R1 paper, §2.3 and §2.4).

Stages, each cached under out_dir/<stage>/ (its result.json marks it done; a training stage stopped
part-way resumes from its checkpoints):

  cold_start    SFT of the base on a few readable traces of training problems: from the task's own
                trace generator when it has one (chain_sum: running sums; arithmetic: the worked form
                of the pretraining corpus), else by rejection sampling from the base with a
                readability filter
  reasoning_rl  GRPO from the cold-start model: accuracy + format + language consistency (`r1`)
  rejection     k samples per training problem from the RL model; the correct, readable ones
  sft           SFT of the *base* model on them (R1 trains DeepSeek-V3-Base on this data, not the RL model)
  final_rl      GRPO from the SFT model, same rewards
  distill       SFT of a small dense student (a preset with dense FFNs, from scratch) on the final model's
                verified, readable traces
  eval          held-out evaluation of every stage's model (accuracy, length, format, readability)

Every stage's work is fixed in steps (GRPO: `rl_steps`, `final_rl_steps`; SFT: epochs over a sampled set
that the seed fixes); each training stage's result records the steps it ran and planned (`cut_short`).
`nanoseek demo` runs these same stages on its base model next to R1-Zero.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from nanoseek.config import PRESETS, preset
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.errors import UserError, require, warn
from nanoseek.files import write_json
from nanoseek.hf import load_model_and_tokenizer
from nanoseek.r1.configs import DistillConfig, GRPOConfig, SFTConfig
from nanoseek.r1.corpus import running_sum_trace
from nanoseek.r1.distill import run_distill
from nanoseek.r1.evaluate import evaluate_model
from nanoseek.r1.grpo import run_grpo
from nanoseek.r1.rewards import language_consistency, parse_completion
from nanoseek.r1.rollout import build_task, render_prompt
from nanoseek.r1.sample import sample_traces, write_jsonl
from nanoseek.r1.sft import run_sft
from nanoseek.r1.tasks import TEMPLATES, Problem, Task
from nanoseek.stages import Stages
from nanoseek.train.checkpoint import list_checkpoints
from nanoseek.train.config import load_train_config

STAGES = ("cold_start", "reasoning_rl", "rejection", "sft", "final_rl", "distill", "eval")


@dataclass
class R1Config:
    model: str = ""  # the base model directory
    out_dir: str = "runs/r1"
    task: str = "chain_sum"
    task_options: dict = field(default_factory=dict)
    task_seed: int = 0
    n_train: int = 2000
    n_test: int = 200
    template: str = "compact"
    max_new_tokens: int = 64
    seed: int = 0
    # cold start
    cold_start_examples: int = 200
    cold_start_epochs: int = 3
    sft_lr: float = 3e-4
    # RL stages (GRPO, `r1` rewards: accuracy + format + language consistency)
    rewards: str = "r1"
    rl_steps: int = 100
    final_rl_steps: int = 50
    group_size: int = 8
    prompts_per_step: int = 16
    rl_lr: float = 5e-5
    # rejection sampling + SFT
    k: int = 4
    sft_epochs: int = 2
    # distillation
    student: str = "tiny"  # a preset, built from scratch
    student_dense: bool = True  # every trunk layer a dense FFN (R1 distils into dense Qwen / Llama models)
    distill_epochs: int = 15  # a student from scratch: 5 epochs left it at 1% (format 15%), 15 at 24% (chain_sum)
    distill_lr: float = 1e-3
    eval_k: int = 4
    eval_base: bool = True  # evaluate the base model too (`nanoseek demo` has already, with the same settings)

    def validate(self) -> None:
        for ok, name, allowed in [
            (bool(self.model), "model", "a base model directory (--model DIR)"),
            (self.template in TEMPLATES, "template", " | ".join(TEMPLATES)),
            (self.cold_start_examples >= 1, "cold_start_examples", ">= 1"),
            (min(self.cold_start_epochs, self.sft_epochs, self.distill_epochs) >= 1, "epochs", ">= 1"),
            (min(self.rl_steps, self.final_rl_steps) >= 1, "rl_steps", ">= 1"),
            (self.group_size >= 2, "group_size", ">= 2"),
            (self.k >= 1 and self.eval_k >= 1, "k", ">= 1"),
            (all(math.isfinite(x) and x > 0 for x in (self.sft_lr, self.rl_lr, self.distill_lr)), "lr", "> 0"),
            (self.max_new_tokens >= 1, "max_new_tokens", ">= 1"),
            (self.student in PRESETS, "student", " | ".join(PRESETS)),
        ]:
            require(ok, name, getattr(self, name, None), allowed)


# ---------------------------------------------------------------------------------------------- traces
def readable(text: str, opened_think: bool = True) -> bool:
    """R1's readability filter, in miniature: well formed, reasoning in one language (the target
    script), no control tokens, no step repeated word for word."""
    parsed = parse_completion(text, opened_think)
    if not parsed.well_formed or not parsed.think or "<|" in text:
        return False
    steps = [s.strip() for s in parsed.think.replace(".", ",").split(",") if s.strip()]
    return len(steps) == len(set(steps)) and language_consistency(parsed.think) == 1.0


def generated_trace(task: str, problem: Problem) -> str | None:
    """A readable trace from the task's own generator, or None when the task has none. chain_sum: running
    sums (long); arithmetic: `23+18=41`, the worked form of the pretraining corpus (`corpus.worked_example`),
    which for a two-operand sum is the whole reasoning."""
    if task == "chain_sum":
        return f"{running_sum_trace(problem.meta['terms'], check=False)}</think><answer>{problem.answer}</answer>"
    if task == "arithmetic":
        return f"{problem.meta['compact']}={problem.answer}</think><answer>{problem.answer}</answer>"
    return None


def held_out_metrics(model_dir: str, task: Task, *, template: str, k: int, max_new_tokens: int, seed: int,
                     samples_out: Path) -> dict:
    """A model's held-out evaluation (`evaluate_model`: greedy accuracy, pass@1 over k samples, format rate,
    mean response length, ...) plus the share of readable completions (greedy and sampled) and its size."""
    model, tok = load_model_and_tokenizer(model_dir)
    result = evaluate_model(model, tok, task, k=k, template=template, max_new_tokens=max_new_tokens, seed=seed,
                            samples_out=samples_out)
    rows = [json.loads(x) for x in Path(samples_out).read_text(encoding="utf-8").splitlines()]
    return {**json.loads(result.to_json()),
            "readable": sum(readable(x["completion"]) for x in rows) / max(1, len(rows)),
            "params": sum(p.numel() for p in model.parameters())}


def cut_short(results: dict[str, dict]) -> list[str]:
    """One line per stage result that ran fewer steps than it planned (its numbers are not the run's)."""
    return [f"the {name} stage was cut short: {r['steps']} of {r['planned_steps']} steps ran"
            for name, r in results.items() if r.get("steps", 0) < r.get("planned_steps", 0)]


# ---------------------------------------------------------------------------------------------- pipeline
class R1Pipeline:
    def __init__(self, cfg: R1Config):
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        self.task: Task = build_task(cfg.task, seed=cfg.task_seed, n_train=cfg.n_train, n_test=cfg.n_test,
                                     options=cfg.task_options)
        self.stages = Stages(self.out, label="r1")
        self.results: dict[str, Any] = self.stages.results

    def stage(self, name: str, fn: Callable[[Path], dict]) -> dict:
        return self.stages.run(name, fn)

    # -- helpers -------------------------------------------------------------------------------------
    def sft(self, folder: Path, init: str, rows: list[dict], epochs: int, lr: float, student: str = "") -> dict:
        """SFT (or, with `student`, distillation into a fresh student) on `rows`: the model and its steps."""
        if not rows:
            raise UserError(f"{folder.name}: no traces to train on (nothing correct and readable was sampled)")
        data = write_jsonl(rows, folder / "traces.jsonl")
        common = dict(data=str(data), out_dir=str(folder / "run"), epochs=epochs, lr=lr, seq_len=128, batch_size=8,
                      eval_every=0, save_every=0, tensorboard=False, seed=self.cfg.seed)
        resume = bool(list_checkpoints(folder / "run" / "checkpoints"))
        if student:
            dense = {"first_k_dense_replace": preset(student).num_hidden_layers} if self.cfg.student_dense else {}
            trainer = run_distill(DistillConfig(model=student, tokenizer=self.cfg.model, model_overrides=dense,
                                                **common), resume=resume)
        else:
            trainer = run_sft(SFTConfig(model=init, init_from=init, **common), resume=resume)
        return {"model": str(folder / "run" / "model"), "examples": len(rows), "steps": trainer.step,
                "planned_steps": trainer.cfg.max_steps}

    def grpo(self, folder: Path, init: str, steps: int) -> dict:

        c = self.cfg
        cfg = GRPOConfig(model=init, init_from=init, out_dir=str(folder / "run"), task=c.task,
                         task_options=c.task_options, task_seed=c.task_seed, n_train=c.n_train, n_test=c.n_test,
                         template=c.template, group_size=c.group_size, prompts_per_step=c.prompts_per_step,
                         max_new_tokens=c.max_new_tokens, rewards=c.rewards, lr=c.rl_lr, max_steps=steps,
                         eval_every=0, sample_every=0, show_samples=0, save_every=max(1, steps // 2),
                         tensorboard=False, seed=c.seed)
        trainer = run_grpo(cfg, resume=bool(list_checkpoints(folder / "run" / "checkpoints")))
        return {"model": str(folder / "run" / "model"), "steps": trainer.step, "planned_steps": steps,
                "diagnostics": [f.line() for f in trainer.diagnostics]}

    def sample(self, model_dir: str, problems: list[Problem], k: int) -> tuple[list[dict], dict]:
        """Correct, readable, distinct completions of `problems` (k samples each, T = 1)."""

        model, tok = load_model_and_tokenizer(model_dir)
        sub = Task(self.task.name, problems, [], self.task.verifier, self.task.normalize, self.task.timeout_s)
        rows, stats = sample_traces(model, tok, sub, k=k, template=self.cfg.template,
                                    max_new_tokens=self.cfg.max_new_tokens, seed=self.cfg.seed)
        kept = [r for r in rows if readable(r["completion"])]
        return kept, {**stats, "readable": len(kept)}

    # -- stages --------------------------------------------------------------------------------------
    def cold_start(self, folder: Path) -> dict:

        tok = load_tokenizer(self.cfg.model)
        problems = self.task.train[:self.cfg.cold_start_examples]
        traces = [(p, generated_trace(self.task.name, p)) for p in problems]
        if all(t is not None for _, t in traces):
            rows = [{"prompt": render_prompt(p, self.cfg.template, tok), "completion": t} for p, t in traces]
            source = "task generator"
        else:
            rows, _ = self.sample(self.cfg.model, problems, max(self.cfg.k, 8))
            source = "rejection sampling from the base (readable only)"
        return {**self.sft(folder, self.cfg.model, rows, self.cfg.cold_start_epochs, self.cfg.sft_lr),
                "source": source}

    def rejection(self, folder: Path) -> dict:

        rows, stats = self.sample(self.results["reasoning_rl"]["model"], self.task.train, self.cfg.k)
        write_jsonl(rows, folder / "traces.jsonl")
        return {"traces": str(folder / "traces.jsonl"), **stats}

    def sft_stage(self, folder: Path) -> dict:
        rows = [json.loads(x) for x in Path(self.results["rejection"]["traces"]).read_text().splitlines()]
        cold = [json.loads(x) for x in (self.out / "cold_start" / "traces.jsonl").read_text().splitlines()]
        return self.sft(folder, self.cfg.model, rows + cold, self.cfg.sft_epochs, self.cfg.sft_lr)

    def distill(self, folder: Path) -> dict:
        rows, stats = self.sample(self.results["final_rl"]["model"], self.task.train, self.cfg.k)
        return {**stats, **self.sft(folder, "", rows, self.cfg.distill_epochs, self.cfg.distill_lr,
                                    student=self.cfg.student)}

    def evaluate(self, folder: Path) -> dict:

        c = self.cfg
        models = {"base": c.model} if c.eval_base else {}
        models.update({s: self.results[s]["model"] for s in STAGES[:-1] if s != "rejection"})
        return {"models": {name: held_out_metrics(model_dir, self.task, template=c.template, k=c.eval_k,
                                                  max_new_tokens=c.max_new_tokens, seed=c.seed,
                                                  samples_out=folder / f"{name}.samples.jsonl")
                           for name, model_dir in models.items()}}

    def run(self) -> dict[str, dict]:
        """Every stage in order (cached ones reused); the results by stage name."""
        self.stage("cold_start", self.cold_start)
        self.stage("reasoning_rl", lambda f: self.grpo(f, self.results["cold_start"]["model"], self.cfg.rl_steps))
        self.stage("rejection", self.rejection)
        self.stage("sft", self.sft_stage)
        self.stage("final_rl", lambda f: self.grpo(f, self.results["sft"]["model"], self.cfg.final_rl_steps))
        self.stage("distill", self.distill)
        self.stage("eval", self.evaluate)
        return self.results


def run_r1(cfg: R1Config) -> dict[str, dict]:
    cfg.validate()
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(cfg.out_dir) / "r1_config.json", asdict(cfg))
    return R1Pipeline(cfg).run()


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model directory (HF format with tokenizer.json)")
    p.add_argument("--task", help="chain_sum | arithmetic | countdown | FILE.jsonl")
    p.add_argument("--config", help="TOML file with R1 pipeline settings")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rl_steps=200 student=tiny")


def run(args: argparse.Namespace) -> int:

    extra = [f"model={args.model}"] if args.model else []
    extra += [f"task={args.task}"] if args.task else []
    cfg = load_train_config(R1Config, args.config, extra + list(args.overrides))
    results = run_r1(cfg)
    for line in cut_short(results):
        warn(line)

    t = Table(title=f"nanoseek r1: {cfg.task}, held-out test")
    for col in ("model", "params", "greedy acc", "pass@1", "length", "format", "readable"):
        t.add_column(col, justify="right")
    for name, m in results["eval"]["models"].items():
        t.add_row(name, f"{m['params']:,}", f"{m['greedy_accuracy']:.1%}", f"{(m['pass_at_1'] or 0):.1%}",
                  f"{m['mean_response_length']:.1f}", f"{m['format_rate']:.1%}", f"{m['readable']:.1%}")
    Console().print(t)
    return 0
