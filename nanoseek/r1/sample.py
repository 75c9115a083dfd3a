"""`nanoseek sample --model DIR --task NAME -k K --out traces.jsonl`: rejection sampling.

R1's stage 3 in miniature: draw k completions for every problem of a split, keep the ones the
verifier accepts (well formed and correct, the accuracy reward's rule), and write them as SFT data:

    {"prompt": <the rendered prompt>, "completion": <the completion>, "answer", "problem", "task",
     "template", "reward", "tokens", "model"}

`prompt` is the exact text the model was prompted with, so `nanoseek sft` / `nanoseek distill` use
it as is (template "none") and the student learns the same prompt -> completion mapping the teacher
was scored on. Identical completions of one problem are kept once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseek.errors import UserError
from nanoseek.r1.evaluate import add_task_arguments, task_from_args
from nanoseek.r1.rollout import load_policy, rollout
from nanoseek.r1.tasks import Task


def sample_traces(model, tokenizer, task: Task, *, k: int = 8, template: str = "compact",
                  max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                  split: str = "train", n_problems: int | None = None,
                  max_per_problem: int | None = None, seed: int = 0, batch_size: int = 64,
                  model_name: str = "") -> tuple[list[dict], dict]:
    """(verified traces as SFT rows, statistics). `max_per_problem` caps the distinct correct
    completions kept per problem (None: all)."""
    if k < 1:
        raise UserError(f"-k must be >= 1, got {k}")
    problems = getattr(task, split)
    problems = problems[:n_problems] if n_problems else problems
    if not problems:
        raise UserError(f"task {task.name!r} has no {split} problems")
    groups = rollout(model, tokenizer, task, problems, n=k, template=template,
                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     seed=seed, batch_size=batch_size, progress="sampling")
    rows = []
    for problem, group in zip(problems, groups):
        seen: set[str] = set()
        for s in group:
            if not s.sample.correct or s.text in seen:
                continue
            if max_per_problem and len(seen) >= max_per_problem:
                break
            seen.add(s.text)
            rows.append({"prompt": s.prompt, "completion": s.text, "answer": problem.answer,
                         "problem": problem.prompt_text, "task": task.name, "template": template,
                         "reward": s.rewards["total"], "tokens": len(s.completion.tokens),
                         "model": model_name})
    n = len(problems) * k
    correct = sum(s.sample.correct for g in groups for s in g)
    stats = {"problems": len(problems), "samples": n, "correct": correct,
             "accept_rate": correct / n, "kept": len(rows),
             "problems_solved": sum(any(s.sample.correct for s in g) for g in groups),
             "format_rate": sum(s.sample.well_formed for g in groups for s in g) / n}
    return rows, stats


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF format, with tokenizer.json)")
    add_task_arguments(p)
    p.add_argument("-k", type=int, default=8, help="completions per problem")
    p.add_argument("--out", required=True, help="output JSONL of verified traces")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="problems to sample (train: never leak test answers into SFT data)")
    p.add_argument("--limit", type=int, default=0, help="only the first N problems")
    p.add_argument("--max-per-problem", type=int, default=0,
                   help="keep at most N distinct correct completions per problem (0 = all)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.core import resolve_device

    task = task_from_args(args)
    model, tok = load_policy(args.model, resolve_device(args.device))
    rows, stats = sample_traces(model, tok, task, k=args.k, template=args.template,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, split=args.split, n_problems=args.limit or None,
                                max_per_problem=args.max_per_problem or None, seed=args.seed,
                                batch_size=args.batch_size, model_name=str(args.model))
    out = write_jsonl(rows, args.out)
    metrics = out.with_name(out.stem + ".metrics.jsonl")
    with open(metrics, "a", encoding="utf-8") as f:
        f.write(json.dumps({"out": str(out), "model": str(args.model), **stats}) + "\n")
    print(f"kept {stats['kept']} verified traces from {stats['samples']} samples "
          f"({100 * stats['accept_rate']:.1f}% correct, {stats['problems_solved']}/"
          f"{stats['problems']} problems solved) -> {out}")
    if not rows:
        print("warning: no completion verified; nothing to distill (try more samples, -k)")
    return 0
