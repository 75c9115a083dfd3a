"""The `chain_sum` task: the sum of a chain of small numbers ("3 + 5 + 8 + 2 + 7 + 4"), one integer
answer. Built for the R1-Zero length-growth experiment (benchmarks/r1_length.py): a long chain is
hard to add in one go and easy to add step by step (running sums), so longer reasoning pays.

Training problems mix chains of `min_terms`..`max_terms` numbers; the test split is the *hard* split
only: chains of at least `hard_terms` numbers (`test_split="all"` draws it like training).
"""

from __future__ import annotations

import random

from nanoseek.errors import UserError
from nanoseek.r1.tasks.arithmetic import verify_arithmetic
from nanoseek.r1.tasks.generated import unique_problems
from nanoseek.r1.tasks.problem import Problem, Task, normalize_text
from nanoseek.r1.verify import parse_number


def chain_problem(terms: list[int]) -> Problem:
    return Problem(f"What is {' + '.join(map(str, terms))}?", str(sum(terms)),
                   {"compact": "+".join(map(str, terms)), "terms": list(terms)})


def chain_sum_task(seed: int = 0, n_train: int = 1000, n_test: int = 100,
                   difficulty: int | None = None, *, min_terms: int = 2, max_terms: int | None = None,
                   hard_terms: int | None = None, max_value: int = 9, test_split: str = "hard") -> Task:
    """difficulty d (default 4): chains of up to d + 2 numbers (`max_terms` overrides), each 1..max_value;
    the hard split holds chains of at least `hard_terms` numbers (default max_terms - 1)."""
    d = 4 if difficulty is None else int(difficulty)
    top = max_terms if max_terms is not None else d + 2
    hard = hard_terms if hard_terms is not None else max(min_terms, top - 1)
    if not (2 <= min_terms <= hard <= top) or max_value < 1 or test_split not in ("hard", "all"):
        raise UserError(f"chain_sum needs 2 <= min_terms <= hard_terms <= max_terms, max_value >= 1 and "
                        f"test_split hard|all; got {min_terms}, {hard}, {top}, {max_value}, {test_split!r}")
    if n_train < 0 or n_test < 0:
        raise UserError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")

    def maker(lo: int):
        def make(rng: random.Random) -> tuple[tuple, Problem]:
            terms = [rng.randint(1, max_value) for _ in range(rng.randint(lo, top))]
            return tuple(terms), chain_problem(terms)
        return make

    seen: set = set()  # test first, from its own stream; training never repeats a test chain
    tag = f"chain_sum:{seed}:{min_terms}:{hard}:{top}:{max_value}"
    test = unique_problems(maker(hard if test_split == "hard" else min_terms), n_test,
                           random.Random(f"{tag}:{test_split}:test"), seen, "chain_sum")
    train = unique_problems(maker(min_terms), n_train, random.Random(f"{tag}:train"), seen, "chain_sum")
    return Task("chain_sum", train, test, verify_arithmetic, normalize=_number_key)


def _number_key(answer: str) -> str:
    value = parse_number(answer)
    return normalize_text(answer) if value is None else str(value)
