"""Shared machinery of the generated tasks: seeded, disjoint train/test splits and random
expression trees rendered with minimal parentheses."""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any, Callable

from nanoseek.errors import UserError
from nanoseek.r1.tasks.problem import Problem


def unique_problems(make: Callable[[random.Random], tuple[Any, Problem]], n: int, rng: random.Random,
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


def split_problems(name: str, seed: int, difficulty: int, n_train: int, n_test: int,
           make: Callable[[random.Random], tuple[Any, Problem]]) -> tuple[list, list]:
    """Test first from its own stream (stable under n_train), then train excluding test keys."""
    if n_train < 0 or n_test < 0:
        raise UserError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    seen: set = set()
    test = unique_problems(make, n_test, random.Random(f"{name}:{seed}:{difficulty}:test"), seen, name)
    train = unique_problems(make, n_train, random.Random(f"{name}:{seed}:{difficulty}:train"), seen, name)
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


def random_expression(rng: random.Random, leaves: list[int], ops: str,
                       integer_steps: bool) -> tuple[str, int, Fraction] | None:
    """Random binary tree over `leaves` (in order). Returns (text, precedence, value), or None when
    `integer_steps` and some step is a non-integer or negative (classic Countdown rules)."""
    if len(leaves) == 1:
        return str(leaves[0]), 3, Fraction(leaves[0])
    cut = rng.randint(1, len(leaves) - 1)
    left = random_expression(rng, leaves[:cut], ops, integer_steps)
    right = random_expression(rng, leaves[cut:], ops, integer_steps)
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
