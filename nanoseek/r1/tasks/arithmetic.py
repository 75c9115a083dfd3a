"""The `arithmetic` task: multi-step integer arithmetic, one integer answer."""

from __future__ import annotations

import random
from fractions import Fraction

from nanoseek.errors import UserError
from nanoseek.r1.tasks.generated import random_expression, split_problems
from nanoseek.r1.tasks.problem import Problem, Task, normalize_text
from nanoseek.r1.verify import parse_number


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
        text, _, value = random_expression(rng, leaves, ops, integer_steps=False)
        problem = Problem(f"What is {text}?", str(value), {"compact": text.replace(" ", "")})
        return text, problem

    train, test = split_problems("arithmetic", seed, d, n_train, n_test, make)
    return Task("arithmetic", train, test, verify_arithmetic, normalize=_number_key)


def verify_arithmetic(answer: str, problem: Problem) -> bool:
    """Correct iff the answer is a plain number equal to the reference (an expression is not:
    repeating the question back would otherwise "evaluate" to the right answer)."""
    value = parse_number(answer)
    return value is not None and value == Fraction(problem.answer)


def _number_key(answer: str) -> str:
    value = parse_number(answer)
    return normalize_text(answer) if value is None else str(value)
