"""The `jsonl` task: {"prompt", "answer"} lines from a user file, answers checked with math_verify."""

from __future__ import annotations

import logging
import os
import random
import re

from nanoseek.data.jsonl import read_jsonl_objects
from nanoseek.errors import UserError
from nanoseek.r1.tasks.problem import Problem, Task, normalize_text

MAX_ANSWER_CHARS = 1000  # longer "answers" are rambling, and sympy parsing time grows with length


def load_jsonl_problems(path: str | os.PathLike) -> list[Problem]:
    """Read {"prompt": str, "answer": str|number, ...} lines; other fields go to `meta`.

    Raises UserError naming the file and line for a missing file, bad JSON, a non-object line,
    a missing or empty field, or a file with no problems. Blank lines are skipped."""
    problems = [_problem_from_row(row, where, lineno) for lineno, where, row in read_jsonl_objects(path)]
    if not problems:
        raise UserError(f"{path}: no problems (the file is empty)")
    return problems


def _problem_from_row(row: dict, where: str, lineno: int) -> Problem:
    missing = [k for k in ("prompt", "answer") if k not in row]
    if missing:
        raise UserError(f"{where}: missing field {' and '.join(repr(k) for k in missing)} "
                        f"(fields present: {', '.join(map(repr, row)) or 'none'})")
    prompt, answer = row.pop("prompt"), row.pop("answer")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: 'prompt' must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) \
            or not str(answer).strip():
        raise UserError(f"{where}: 'answer' must be a non-empty string or a number")
    return Problem(prompt, str(answer).strip(), {**row, "line": lineno})


_MATH_DELIMITERS = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]")


def verify_math(answer: str, problem: Problem) -> bool:
    """math_verify equivalence of answer and reference (so "0.5" matches "\\frac{1}{2}"); plain
    string equality when the reference itself cannot be parsed.

    The answer is parsed as ONE math expression (its own $ delimiters removed, then wrapped in a
    single pair): left to itself math_verify extracts the last number it finds, so the hedge
    "7 or 6" would match 6. math_verify's own timeouts use SIGALRM, which raises off the main
    thread (a known TRL pitfall); they are off here because `Task.score` already runs the call
    under `run_with_timeout`."""
    from math_verify import parse, verify

    _quiet_math_verify()
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    gold = parse(problem.answer, parsing_timeout=None)
    if not gold:
        return normalize_text(answer) == normalize_text(problem.answer)
    target = parse(f"${_MATH_DELIMITERS.sub(' ', answer).strip()}$", parsing_timeout=None)
    return bool(verify(gold, target, timeout_seconds=None))


_WARM = False


def warm_up_math_verify() -> None:
    """Import math_verify (and sympy, which it loads on first use) and grade one answer, once per
    process and outside any time limit. A cold import takes ~0.5 s, well over 1 s on a busy machine,
    so without this the first graded completion of a run can time out and score 0 although correct."""
    global _WARM
    if not _WARM:
        try:
            verify_math("\\frac{1}{2}", Problem("warm-up", "0.5"))
        except ImportError as e:
            raise UserError(f"jsonl tasks grade answers with math_verify, which does not import ({e}): "
                            "pip install math-verify") from None
        _WARM = True


class _DropTimeoutNotice(logging.Filter):
    """math_verify warns once that its timeouts are off; ours are on, so the notice misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


_QUIETED = False


def _quiet_math_verify() -> None:
    global _QUIETED
    if not _QUIETED:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutNotice())
        _QUIETED = True


def jsonl_task(path: str | os.PathLike, seed: int = 0, n_train: int | None = None,
               n_test: int = 100, *, test_path: str | os.PathLike | None = None) -> Task:
    """A task from a jsonl file. With `test_path` the two files are the splits (test prompts are
    removed from train). Otherwise unique prompts are shuffled with `seed` and `n_test` of them
    (at most all but one) become the test split. `n_train` caps the train split (None: all)."""
    problems = _dedupe(load_jsonl_problems(path))
    if test_path is not None:
        test = _dedupe(load_jsonl_problems(test_path))
        test_prompts = {p.prompt_text for p in test}
        train = [p for p in problems if p.prompt_text not in test_prompts]
    else:
        random.Random(f"jsonl:{seed}").shuffle(problems)
        k = min(n_test, len(problems) - 1)
        test, train = problems[:k], problems[k:]
    if n_train is not None:
        train = train[:n_train]
    if not train:
        raise UserError(f"{path}: no training problems left after removing the test split")
    return Task("jsonl", train, test, verify_math)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    """Drop repeated prompts (first one wins) so a prompt cannot sit in both splits."""
    seen: set[str] = set()
    out = []
    for p in problems:
        if p.prompt_text not in seen:
            seen.add(p.prompt_text)
            out.append(p)
    return out
