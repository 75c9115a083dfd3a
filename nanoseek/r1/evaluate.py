"""`nanoseek eval --model DIR --task NAME [-k 4] [--json]`: accuracy of a model on a task's test split.

Reports greedy accuracy, pass@1 averaged over k samples (temperature > 0), pass@k, maj@k, the share
of well-formed completions and the mean response length (as DeepSeek-R1 §3 reports AIME). A
completion counts as correct only when it is well formed and its `<answer>` verifies, the same rule
the accuracy reward uses, so eval and training agree on what "correct" means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseek.device import resolve_device
from nanoseek.errors import UserError
from nanoseek.files import write_lines
from nanoseek.hf import load_model_and_tokenizer, model_directory
from nanoseek.r1.cli_options import (
    add_task_arguments,
    check_generation_args,
    check_output_file,
    task_from_args,
)
from nanoseek.r1.eval_metrics import EvalResult
from nanoseek.r1.rollout import rollout
from nanoseek.r1.tasks import Task


def evaluate_model(model, tokenizer, task: Task, *, k: int = 4, template: str = "compact",
                   max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                   n_problems: int | None = None, greedy: bool = True, seed: int = 0,
                   batch_size: int = 64, samples_out: str | Path | None = None) -> EvalResult:
    """Evaluate on `task.test` (its first `n_problems`). k = 0 skips sampling, greedy=False skips
    the greedy pass. `samples_out` writes every completion as JSONL for inspection."""
    problems = task.test[:n_problems] if n_problems else task.test
    if not problems:
        raise UserError(f"task {task.name!r} has no test problems to evaluate")
    common = dict(template=template, max_new_tokens=max_new_tokens, batch_size=batch_size)
    greedy_rows = rollout(model, tokenizer, task, problems, n=1, temperature=0.0,
                          progress="eval greedy", **common) if greedy else []
    sampled_rows = rollout(model, tokenizer, task, problems, n=k, temperature=temperature,
                           top_p=top_p, seed=seed, progress=f"eval k={k}", **common) \
        if k > 0 else []
    result = EvalResult.from_samples(task.name, [[s.sample for s in row] for row in sampled_rows],
                                     greedy=[row[0].sample for row in greedy_rows] or None,
                                     key=task.answer_key)
    result.extra["truncated"] = _truncated_share(greedy_rows + sampled_rows)
    failures = task.stats.errors + task.stats.timeouts
    if failures:
        result.extra["verifier_failures"] = failures
    if samples_out:
        _write_samples(samples_out, greedy_rows, sampled_rows)
    return result


def _truncated_share(rows) -> float:
    every = [s for row in rows for s in row]
    return round(sum(s.completion.truncated for s in every) / max(1, len(every)), 4)


def _write_samples(path, greedy_rows, sampled_rows) -> None:
    write_lines(path, (json.dumps({"kind": kind, "problem": i, "prompt": s.prompt,
                                   "completion": s.text, "answer": s.sample.answer,
                                   "correct": s.sample.correct, "well_formed": s.sample.well_formed,
                                   "tokens": s.sample.n_tokens,
                                   "finish_reason": s.completion.finish_reason})
                       for kind, rows in (("greedy", greedy_rows), ("sample", sampled_rows))
                       for i, row in enumerate(rows) for s in row))


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF format, with tokenizer.json)")
    add_task_arguments(p)
    p.add_argument("-k", type=int, default=4, help="samples per problem for pass@1 / maj@k (0 = none)")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    p.add_argument("--samples-out", help="write every completion to this JSONL file")
    p.add_argument("--metrics-out", help="append the result to this JSONL file "
                                         "(default: MODEL/eval.jsonl; '' = none)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    check_generation_args(args, min_k=0)
    model_directory(args.model)
    metrics_out = Path(args.model) / "eval.jsonl" if args.metrics_out is None else args.metrics_out
    for flag, path in (("--samples-out", args.samples_out), ("--metrics-out", metrics_out)):
        if path:
            check_output_file(path, flag)
    device = resolve_device(args.device, "--device")
    task = task_from_args(args)
    model, tok = load_model_and_tokenizer(args.model, device=device)
    result = evaluate_model(model, tok, task, k=args.k, template=args.template,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, n_problems=args.limit or None,
                            greedy=not args.no_greedy, seed=args.seed, batch_size=args.batch_size,
                            samples_out=args.samples_out)
    result.extra["model"] = str(args.model)
    if metrics_out:
        settings = {k: getattr(args, k) for k in ("task", "difficulty", "task_seed", "n_test",
                                                  "task_option", "template", "max_new_tokens",
                                                  "temperature", "seed", "limit")}
        with open(metrics_out, "a", encoding="utf-8") as f:
            f.write(json.dumps({**json.loads(result.to_json()), "settings": settings}) + "\n")
    if args.json:
        print(result.to_json())
    else:
        from rich.console import Console

        Console().print(result.to_rich_table())
    return 0

