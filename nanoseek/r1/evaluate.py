"""`nanoseek eval --model DIR --task NAME [-k 4] [--json]`: accuracy of a model on a task's test split.

Reports greedy accuracy, pass@1 averaged over k samples (temperature > 0), pass@k, maj@k, the share
of well-formed completions and the mean response length (REFERENCE §6: how R1 reports AIME). A
completion counts as correct only when it is well formed and its `<answer>` verifies, the same rule
the accuracy reward uses, so eval and training agree on what "correct" means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanoseek.r1.metrics import EvalResult
from nanoseek.r1.rollout import build_task, load_policy, rollout
from nanoseek.r1.tasks import TEMPLATES, Task


def evaluate_model(model, tokenizer, task: Task, *, k: int = 4, template: str = "compact",
                   max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                   n_problems: int | None = None, greedy: bool = True, seed: int = 0,
                   batch_size: int = 64, samples_out: str | Path | None = None) -> EvalResult:
    """Evaluate on `task.test` (its first `n_problems`). k = 0 skips sampling, greedy=False skips
    the greedy pass. `samples_out` writes every completion as JSONL for inspection."""
    problems = task.test[:n_problems] if n_problems else task.test
    if not problems:
        from nanoseek.errors import UserError

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
    with open(path, "w", encoding="utf-8") as f:
        for kind, rows in (("greedy", greedy_rows), ("sample", sampled_rows)):
            for i, row in enumerate(rows):
                for s in row:
                    f.write(json.dumps({"kind": kind, "problem": i, "prompt": s.prompt,
                                        "completion": s.text, "answer": s.sample.answer,
                                        "correct": s.sample.correct,
                                        "well_formed": s.sample.well_formed,
                                        "tokens": s.sample.n_tokens,
                                        "finish_reason": s.completion.finish_reason}) + "\n")


# ---------------------------------------------------------------------------------------------- CLI
def add_task_arguments(p: argparse.ArgumentParser, n_test: int = 200) -> None:
    """Task options shared by eval and sample."""
    p.add_argument("--task", required=True,
                   help="arithmetic | countdown | FILE.jsonl of {prompt, answer} lines")
    p.add_argument("--difficulty", type=int, default=0, help="task difficulty (0 = task default)")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the generated train/test split")
    p.add_argument("--n-train", type=int, default=1000, help="training problems to generate")
    p.add_argument("--n-test", type=int, default=n_test, help="test problems (held out)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="task builder option, e.g. max_value=20 or ops=+- (repeatable)")
    p.add_argument("--verifier", default="", help="custom verifier 'package.module:function'")
    p.add_argument("--verifier-timeout", type=float, default=1.0, help="seconds per verifier call")
    p.add_argument("--template", default="compact", choices=TEMPLATES, help="prompt template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto")


def parse_options(items: list[str]) -> dict:
    """KEY=VALUE strings -> dict, values read as JSON when possible (max_value=20 -> int)."""
    from nanoseek.errors import UserError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"task option {item!r} is not key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def task_from_args(args: argparse.Namespace) -> Task:
    return build_task(args.task, seed=args.task_seed, n_train=args.n_train, n_test=args.n_test,
                      difficulty=args.difficulty, options=parse_options(args.task_option),
                      verifier=args.verifier, timeout_s=args.verifier_timeout)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF format, with tokenizer.json)")
    add_task_arguments(p)
    p.add_argument("-k", type=int, default=4, help="samples per problem for pass@1 / maj@k (0 = none)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for the k")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N test problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples-out", help="write every completion to this JSONL file")
    p.add_argument("--metrics-out", help="append the result to this JSONL file "
                                         "(default: MODEL/eval.jsonl; '' = none)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.core import resolve_device

    task = task_from_args(args)
    model, tok = load_policy(args.model, resolve_device(args.device))
    result = evaluate_model(model, tok, task, k=args.k, template=args.template,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, n_problems=args.limit or None,
                            greedy=not args.no_greedy, seed=args.seed, batch_size=args.batch_size,
                            samples_out=args.samples_out)
    result.extra["model"] = str(args.model)
    metrics_out = Path(args.model) / "eval.jsonl" if args.metrics_out is None else args.metrics_out
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


if __name__ == "__main__":  # pragma: no cover
    from nanoseek.cli import main

    sys.exit(main(["eval", *sys.argv[1:]]))
