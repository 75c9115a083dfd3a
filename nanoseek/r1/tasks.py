"""Verifiable tasks for R1-style RL, and the prompt templates that present them.

A `Task` is a train split, a test split and a verifier. Built-in generated tasks (`arithmetic`,
`countdown`) are produced from a seed with disjoint splits: the test set is drawn first from its own
random stream, so it depends only on (seed, n_test, difficulty) and stays fixed while n_train
varies, and training problems identical to a test problem are never generated. A `jsonl` task reads
{"prompt", "answer"} lines and checks answers with `math_verify`; any task can use a user verifier
given as "package.module:function".
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from nanoseek.errors import UserError
from nanoseek.r1.verify import VerifierStats, check_countdown, guarded_score, parse_number

Verifier = Callable[[str, "Problem"], Any]  # returns bool or a float in [0, 1]


@dataclass
class Problem:
    """One question. `answer` is the reference answer (for countdown: one valid expression);
    `meta` holds what the verifier needs (countdown numbers/target) and the `compact` prompt."""

    prompt_text: str
    answer: str
    meta: dict = field(default_factory=dict)


def _normalize_text(answer: str) -> str:
    """Default answer key for majority voting: whitespace-insensitive."""
    return " ".join(answer.split())


@dataclass
class Task:
    """Train/test problems plus a verifier. Use `score`/`verify`, never `verifier` directly: they
    add the time limit, the exception guard and the failure counts in `stats`."""

    name: str
    train: list[Problem]
    test: list[Problem]
    verifier: Verifier
    normalize: Callable[[str], str] = _normalize_text
    timeout_s: float = 1.0
    stats: VerifierStats = field(default_factory=VerifierStats)

    def score(self, answer: str | None, problem: Problem) -> float:
        """Reward in [0, 1] for an extracted answer; 0.0 for no answer or a failed verifier."""
        if answer is None:
            return 0.0
        return guarded_score(self.verifier, answer, problem, self.timeout_s, self.stats)

    def verify(self, answer: str | None, problem: Problem) -> bool:
        """Correct means full credit (score 1.0); partial credit from a float verifier is not."""
        return self.score(answer, problem) >= 1.0

    def answer_key(self, answer: str | None) -> str | None:
        """Canonical form of an answer, so equivalent answers vote together in maj@k."""
        return None if answer is None else self.normalize(answer)


# ================================================================== prompt templates

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {prompt} Assistant: <think>"
)
FORMAT_INSTRUCTION = (
    "Think step by step inside <think> </think>, then give only the final answer inside "
    "<answer> </answer>."
)
TEMPLATES = ("r1_zero", "compact", "chat")


def r1_zero_prompt(problem: Problem) -> str:
    """DeepSeek-R1-Zero's template (REFERENCE §6), ending in an opened `<think>`."""
    text = problem.prompt_text.strip()
    if not text.endswith((".", "?", "!")):
        text += "."
    return R1_ZERO_TEMPLATE.format(prompt=text)


def compact_prompt(problem: Problem) -> str:
    """A few tokens instead of ~80: small CPU models have ~256-token contexts. Ends in `<think>`."""
    return f"Q: {problem.meta.get('compact', problem.prompt_text)}\n<think>"


def chat_prompt(problem: Problem, apply_chat_template: Callable[..., str],
                open_think: bool = True) -> str:
    """The question as a user turn rendered by the tokenizer's chat template, then (as R1's own
    template does) an opened `<think>` unless the template already ends with one."""
    messages = [{"role": "user", "content": f"{problem.prompt_text}\n{FORMAT_INSTRUCTION}"}]
    text = apply_chat_template(messages, add_generation_prompt=True)
    if open_think and not text.rstrip().endswith("<think>"):
        text += "<think>"
    return text


def format_prompt(problem: Problem, template: str = "r1_zero",
                  apply_chat_template: Callable[..., str] | None = None) -> str:
    """Render `problem` with the named template (one of `TEMPLATES`)."""
    if template == "r1_zero":
        return r1_zero_prompt(problem)
    if template == "compact":
        return compact_prompt(problem)
    if template == "chat":
        if apply_chat_template is None:
            raise UserError("template 'chat' needs a tokenizer with a chat template")
        return chat_prompt(problem, apply_chat_template)
    raise UserError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")


def prompt_opens_think(prompt: str) -> bool:
    """True if the prompt leaves a `<think>` open (its last `<think>` has no `</think>` after it).

    Pass this to the rewards: when the template already opened `<think>`, a well-formed completion
    contains only `</think>`, and a format check that demands both tags would never fire."""
    i = prompt.rfind("<think>")
    return i >= 0 and prompt.find("</think>", i) < 0


# ================================================================== generated tasks


def _unique(make: Callable[[random.Random], tuple[Any, Problem]], n: int, rng: random.Random,
            exclude: set, what: str) -> list[Problem]:
    """Draw `n` problems whose keys are distinct and not in `exclude` (adds the keys to it)."""
    out: list[Problem] = []
    attempts = 0
    max_attempts = 50 * n + 2000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise UserError(
                f"could only generate {len(out)} distinct {what} problems of the {n} asked for; "
                f"raise the difficulty or lower n_train/n_test")
        key, problem = make(rng)
        if key not in exclude:
            exclude.add(key)
            out.append(problem)
    return out


def _split(name: str, seed: int, difficulty: int, n_train: int, n_test: int,
           make: Callable[[random.Random], tuple[Any, Problem]]) -> tuple[list, list]:
    """Test first from its own stream (stable under n_train), then train excluding test keys."""
    if n_train < 0 or n_test < 0:
        raise UserError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    seen: set = set()
    test = _unique(make, n_test, random.Random(f"{name}:{seed}:{difficulty}:test"), seen, name)
    train = _unique(make, n_train, random.Random(f"{name}:{seed}:{difficulty}:train"), seen, name)
    return train, test


_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _render(op: str, left: tuple[str, int], right: tuple[str, int]) -> tuple[str, int]:
    """Join two (text, precedence) operands with minimal parentheses (`a - (b + c)` keeps them)."""
    lt, lp = left
    rt, rp = right
    if lp < _PREC[op]:
        lt = f"({lt})"
    if rp < _PREC[op] or (rp == _PREC[op] and op in "-/"):
        rt = f"({rt})"
    return f"{lt} {op} {rt}", _PREC[op]


def _random_expression(rng: random.Random, leaves: list[int], ops: str,
                       integer_steps: bool) -> tuple[str, int, Fraction] | None:
    """Random binary tree over `leaves` (in order). Returns (text, precedence, value), or None when
    `integer_steps` and some step is a non-integer or negative (classic Countdown rules)."""
    if len(leaves) == 1:
        return str(leaves[0]), 3, Fraction(leaves[0])
    cut = rng.randint(1, len(leaves) - 1)
    left = _random_expression(rng, leaves[:cut], ops, integer_steps)
    right = _random_expression(rng, leaves[cut:], ops, integer_steps)
    if left is None or right is None:
        return None
    op = rng.choice(ops)
    a, b = left[2], right[2]
    if op == "/" and b == 0:
        return None
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
    if integer_steps and (value.denominator != 1 or value < 0):
        return None
    text, prec = _render(op, left[:2], right[:2])
    return text, prec, value


def _check_options(name: str, options: dict, allowed: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"task {name!r} has no option {', '.join(unknown)}; "
                        f"options: {', '.join(sorted(allowed)) or 'none'}")


def arithmetic_task(seed: int = 0, n_train: int = 1000, n_test: int = 100,
                    difficulty: int | None = None, *, n_operands: int | None = None,
                    max_value: int | None = None, ops: str = "+-*") -> Task:
    """Multi-step integer arithmetic ("3 + 4 * 2 - 5"); the answer is one integer.

    difficulty d (default 2): d + 1 operands, each in 1..9 for d <= 3, 1..99 for d <= 6, else 1..999.
    `n_operands` / `max_value` override either half of the knob."""
    d = 2 if difficulty is None else int(difficulty)
    if d < 1:
        raise UserError(f"arithmetic difficulty must be >= 1, got {d}")
    n_ops = n_operands if n_operands is not None else d + 1
    top = max_value if max_value is not None else 10 ** (1 + min(d - 1, 6) // 3) - 1
    if n_ops < 2 or top < 1 or not ops or set(ops) - set("+-*"):
        raise UserError(f"arithmetic needs n_operands >= 2, max_value >= 1 and ops from '+-*'; "
                        f"got {n_ops}, {top}, {ops!r}")

    def make(rng: random.Random) -> tuple[str, Problem]:
        leaves = [rng.randint(1, top) for _ in range(n_ops)]
        text, _, value = _random_expression(rng, leaves, ops, integer_steps=False)
        problem = Problem(f"What is {text}?", str(value), {"compact": text.replace(" ", "")})
        return text, problem

    train, test = _split("arithmetic", seed, d, n_train, n_test, make)
    return Task("arithmetic", train, test, verify_arithmetic, normalize=_number_key)


def verify_arithmetic(answer: str, problem: Problem) -> bool:
    """Correct iff the answer is a plain number equal to the reference (an expression is not:
    repeating the question back would otherwise "evaluate" to the right answer)."""
    value = parse_number(answer)
    return value is not None and value == Fraction(problem.answer)


def _number_key(answer: str) -> str:
    value = parse_number(answer)
    return _normalize_text(answer) if value is None else str(value)


def countdown_task(seed: int = 0, n_train: int = 1000, n_test: int = 100,
                   difficulty: int | None = None, *, max_number: int = 50,
                   max_target: int = 100) -> Task:
    """TinyZero's Countdown: reach the target using each given number exactly once with + - * / and
    parentheses. difficulty = how many numbers (default 3). Every instance is solvable: the target
    is the value of a random expression over the numbers (integer, non-negative steps)."""
    n = 3 if difficulty is None else int(difficulty)
    if not 2 <= n <= 8 or max_number < 1 or max_target < 1:
        raise UserError(f"countdown needs 2..8 numbers, max_number >= 1 and max_target >= 1; "
                        f"got {n}, {max_number}, {max_target}")

    def make(rng: random.Random) -> tuple[tuple, Problem]:
        while True:
            numbers = [rng.randint(1, max_number) for _ in range(n)]
            built = _random_expression(rng, numbers, "+-*/", integer_steps=True)
            if built is not None and 1 <= built[2] <= max_target:
                break
        target = int(built[2])
        shown = rng.sample(numbers, len(numbers))
        listed = ", ".join(map(str, shown))
        prompt = (f"Using the numbers [{listed}], create an equation that equals {target}. "
                  f"Use + - * / and parentheses, and each number exactly once.")
        meta = {"numbers": shown, "target": target,
                "compact": f"{' '.join(map(str, shown))} -> {target}"}
        return (tuple(sorted(numbers)), target), Problem(prompt, built[0], meta)

    train, test = _split("countdown", seed, n, n_train, n_test, make)
    return Task("countdown", train, test, verify_countdown,
                normalize=lambda a: re.sub(r"\s+", "", a))


def verify_countdown(answer: str, problem: Problem) -> bool:
    """Correct iff the expression uses each number exactly once and equals the target."""
    return check_countdown(answer, problem.meta["numbers"], problem.meta["target"])


# ================================================================== jsonl tasks

MAX_ANSWER_CHARS = 1000  # longer "answers" are rambling, and sympy parsing time grows with length


def load_jsonl_problems(path: str | os.PathLike) -> list[Problem]:
    """Read {"prompt": str, "answer": str|number, ...} lines; other fields go to `meta`.

    Raises UserError naming the file and line for a missing file, bad JSON, a non-object line,
    a missing or empty field, or a file with no problems. Blank lines are skipped."""
    problems = [_problem_from_row(row, where, lineno) for lineno, where, row in read_jsonl_objects(path)]
    if not problems:
        raise UserError(f"{path}: no problems (the file is empty)")
    return problems


def read_jsonl_objects(path: str | os.PathLike, label: str = "") -> Iterator[tuple[int, str, dict]]:
    """(line number, "file:line", object) for each non-blank line; one UserError naming the file and
    line for a missing file, invalid JSON or a line that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{label}{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield lineno, where, row


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
        return _normalize_text(answer) == _normalize_text(problem.answer)
    target = parse(f"${_MATH_DELIMITERS.sub(' ', answer).strip()}$", parsing_timeout=None)
    return bool(verify(gold, target, timeout_seconds=None))


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


# ================================================================== user verifiers and registry


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


TASKS = ("arithmetic", "countdown", "jsonl")


def get_task(name: str, seed: int = 0, n_train: int | None = 1000, n_test: int = 100,
             difficulty: int | None = None, *, path: str | os.PathLike | None = None,
             test_path: str | os.PathLike | None = None,
             verifier: str | Verifier | None = None, timeout_s: float = 1.0,
             **options: Any) -> Task:
    """Build a task by name: "arithmetic", "countdown", "jsonl" (needs `path`), or a path ending in
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
    elif name in ("arithmetic", "countdown"):
        builder = arithmetic_task if name == "arithmetic" else countdown_task
        allowed = ("n_operands", "max_value", "ops") if name == "arithmetic" \
            else ("max_number", "max_target")
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
    return task
