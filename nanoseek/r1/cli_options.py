"""Command-line options shared by `nanoseek eval` and `nanoseek sample`: the task, the generation
settings, and their validation, which runs before any task is built or model loaded."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from nanoseek.errors import UserError, require
from nanoseek.r1.rollout import build_task
from nanoseek.r1.tasks import TEMPLATES, Task


def add_task_arguments(p: argparse.ArgumentParser, n_test: int = 200) -> None:
    """Task and generation options shared by eval and sample."""
    p.add_argument("--task", required=True,
                   help="arithmetic | countdown | chain_sum | FILE.jsonl of {prompt, answer} lines")
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
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=0, help="only the first N problems (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generation call")
    p.add_argument("--device", default="auto")


def check_generation_args(args: argparse.Namespace, min_k: int) -> None:
    """Every shared numeric option in range (one `SettingError` naming the flag otherwise).
    `-k` must be >= min_k (eval: 0 = no sampling; sample: at least one completion)."""
    finite = math.isfinite
    require(args.k >= min_k, "-k", args.k, f">= {min_k}")
    require(args.batch_size >= 1, "--batch-size", args.batch_size, ">= 1")
    require(finite(args.temperature) and args.temperature >= 0, "--temperature", args.temperature,
            "a finite number >= 0")
    require(finite(args.top_p) and 0 < args.top_p <= 1, "--top-p", args.top_p, "in (0, 1]")
    require(args.max_new_tokens >= 1, "--max-new-tokens", args.max_new_tokens, ">= 1")
    require(args.limit >= 0, "--limit", args.limit, ">= 0 (0 = all)")
    require(args.difficulty >= 0, "--difficulty", args.difficulty, ">= 0 (0 = the task's default)")
    require(args.n_train >= 0, "--n-train", args.n_train, ">= 0")
    require(args.n_test >= 0, "--n-test", args.n_test, ">= 0")
    require(finite(args.verifier_timeout) and args.verifier_timeout > 0, "--verifier-timeout",
            args.verifier_timeout, "a finite number of seconds > 0")


def check_output_file(path: str | Path, flag: str) -> Path:
    """An output file path that can be written: not an existing directory, and not inside a path
    that is a file. Checked before any work, so a long run does not fail at its very end."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name (e.g. {path / 'out.jsonl'})")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    return path


def parse_options(items: list[str]) -> dict:
    """KEY=VALUE strings -> dict, values read as JSON when possible (max_value=20 -> int)."""
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
