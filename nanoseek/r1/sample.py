"""`nanoseek sample --model DIR --task NAME -k K --out traces.jsonl`: rejection sampling.

R1's stage 3 in miniature: draw k completions for every problem of a split, keep the ones the
verifier accepts (well formed and correct, the accuracy reward's rule), and write them as SFT data:

    {"prompt": <the rendered prompt>, "completion": <the completion>, "answer", "problem", "task",
     "template", "reward", "tokens", "model"}

`prompt` is the exact text the model was prompted with, so `nanoseek sft` / `nanoseek distill` use
it as is (template "none") and the student learns the same prompt -> completion mapping the teacher
was scored on. With the chat template the row holds `"messages"` instead (user turn, then the
assistant turn `<think>` + completion): the same tokens, with the turn boundaries built by the
tokenizer rather than read from text. Identical completions of one problem are kept once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nanoseek.data.tokenizer import THINK
from nanoseek.device import resolve_device
from nanoseek.errors import UserError, require, warn
from nanoseek.files import write_lines
from nanoseek.hf import load_model_and_tokenizer, model_directory
from nanoseek.r1.cli_options import (
    add_task_arguments,
    check_generation_args,
    check_output_file,
    task_from_args,
)
from nanoseek.r1.rollout import rollout
from nanoseek.r1.tasks import Problem, Task, chat_messages


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
            rows.append({**trace_text(problem, s.prompt, s.text, template),
                         "answer": problem.answer, "problem": problem.prompt_text,
                         "task": task.name, "template": template, "reward": s.rewards["total"],
                         "tokens": len(s.completion.tokens), "model": model_name})
    n = len(problems) * k
    correct = sum(s.sample.correct for g in groups for s in g)
    stats = {"problems": len(problems), "samples": n, "correct": correct,
             "accept_rate": correct / n, "kept": len(rows),
             "problems_solved": sum(any(s.sample.correct for s in g) for g in groups),
             "format_rate": sum(s.sample.well_formed for g in groups for s in g) / n}
    return rows, stats


def trace_text(problem: Problem, prompt: str, completion: str, template: str) -> dict:
    """The SFT fields of a trace. SFT encodes a file's text as text (typed control tokens stay
    characters), so a chat-template prompt is stored as messages, whose turn tokens SFT builds
    structurally; the assistant turn starts with the `<think>` the prompt opened."""
    if template == "chat":
        return {"messages": [*chat_messages(problem),
                             {"role": "assistant", "content": THINK + completion}]}
    return {"prompt": prompt, "completion": completion}


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write the traces atomically (a crash or a full disk never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_lines(path, (json.dumps(row, ensure_ascii=False) for row in rows))


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF format, with tokenizer.json)")
    add_task_arguments(p)
    p.add_argument("-k", type=int, default=8, help="completions per problem")
    p.add_argument("--out", required=True, help="output JSONL of verified traces")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="problems to sample (train: never leak test answers into SFT data)")
    p.add_argument("--max-per-problem", type=int, default=0,
                   help="keep at most N distinct correct completions per problem (0 = all)")


def run(args: argparse.Namespace) -> int:
    check_generation_args(args, min_k=1)
    require(args.max_per_problem >= 0, "--max-per-problem", args.max_per_problem, ">= 0 (0 = all)")
    model_directory(args.model)
    out = check_output_file(args.out, "--out")
    device = resolve_device(args.device, "--device")
    task = task_from_args(args)
    model, tok = load_model_and_tokenizer(args.model, device=device)
    rows, stats = sample_traces(model, tok, task, k=args.k, template=args.template,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, split=args.split, n_problems=args.limit or None,
                                max_per_problem=args.max_per_problem or None, seed=args.seed,
                                batch_size=args.batch_size, model_name=str(args.model))
    write_jsonl(rows, out)
    metrics = out.with_name(out.stem + ".metrics.jsonl")
    with open(metrics, "a", encoding="utf-8") as f:
        f.write(json.dumps({"out": str(out), "model": str(args.model), **stats}) + "\n")
    print(f"kept {stats['kept']} verified traces from {stats['samples']} samples "
          f"({100 * stats['accept_rate']:.1f}% correct, {stats['problems_solved']}/"
          f"{stats['problems']} problems solved) -> {out}")
    if not rows:
        warn("no completion verified; nothing to distill (try more samples, -k)")
    return 0
