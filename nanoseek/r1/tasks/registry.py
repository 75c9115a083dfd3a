"""Building a task by name (`get_task`), and user verifiers given as "package.module:function"."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Iterable

from nanoseek.errors import UserError
from nanoseek.r1.tasks.arithmetic import arithmetic_task
from nanoseek.r1.tasks.chain_sum import chain_sum_task
from nanoseek.r1.tasks.countdown import countdown_task
from nanoseek.r1.tasks.jsonl_task import jsonl_task, verify_math, warm_up_math_verify
from nanoseek.r1.tasks.problem import Task, Verifier


def _check_options(name: str, options: dict, allowed: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"task {name!r} has no option {', '.join(unknown)}; "
                        f"options: {', '.join(sorted(allowed)) or 'none'}")


def load_verifier(spec: str) -> Verifier:
    """Import "package.module:function" (a function(answer_text, problem) -> bool | float).

    If the module is not importable as is, the current directory is tried too, so a verifier in
    ./my_checks.py works from the `nanoseek` command."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"verifier {spec!r} must look like 'package.module:function'")
    try:
        module = _import(module_name)
    except ImportError as e:
        raise UserError(f"verifier {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise UserError(f"verifier {spec!r}: {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise UserError(f"verifier {spec!r} is not callable")
    return fn


def _import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module_name.split(".")[0] or cwd in sys.path:
            raise
        sys.path.insert(0, cwd)
        return importlib.import_module(module_name)


TASKS = ("arithmetic", "countdown", "chain_sum", "jsonl")
_BUILDERS = {"arithmetic": (arithmetic_task, ("n_operands", "max_value", "ops")),
             "countdown": (countdown_task, ("max_number", "max_target")),
             "chain_sum": (chain_sum_task, ("min_terms", "max_terms", "hard_terms", "max_value", "test_split"))}


def get_task(name: str, seed: int = 0, n_train: int | None = 1000, n_test: int = 100,
             difficulty: int | None = None, *, path: str | os.PathLike | None = None,
             test_path: str | os.PathLike | None = None,
             verifier: str | Verifier | None = None, timeout_s: float = 1.0,
             **options: Any) -> Task:
    """Build a task by name: "arithmetic", "countdown", "chain_sum", "jsonl" (needs `path`), or a path ending in
    ".jsonl". `verifier` ("package.module:function" or a callable) replaces the built-in checker;
    extra `options` go to the task builder (e.g. max_number=99 for countdown)."""
    if name.endswith(".jsonl"):
        name, path = "jsonl", name
    if name == "jsonl":
        _check_options(name, options, ())
        if difficulty is not None:
            raise UserError("task 'jsonl' has no difficulty setting")
        if path is None:
            raise UserError("task 'jsonl' needs a path to a .jsonl file of {prompt, answer} lines")
        task = jsonl_task(path, seed, n_train, n_test, test_path=test_path)
    elif name in _BUILDERS:
        builder, allowed = _BUILDERS[name]
        _check_options(name, options, allowed)
        task = builder(seed, 1000 if n_train is None else n_train, n_test, difficulty, **options)
    else:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)} "
                        f"or give a .jsonl file")
    if verifier is not None:
        task.verifier = load_verifier(verifier) if isinstance(verifier, str) else verifier
    if timeout_s is None or timeout_s <= 0:
        raise UserError(f"verifier timeout must be > 0 seconds, got {timeout_s}")
    task.timeout_s = float(timeout_s)
    if task.verifier is verify_math:  # its cold import must not count against the first call's limit
        warm_up_math_verify()
    return task
