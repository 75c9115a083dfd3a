"""The `countdown` task (TinyZero's): reach a target from given numbers with + - * / and parentheses."""

from __future__ import annotations

import random
import re

from nanoseek.errors import UserError
from nanoseek.r1.tasks.generated import random_expression, split_problems
from nanoseek.r1.tasks.problem import Problem, Task
from nanoseek.r1.verify import check_countdown


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
            built = random_expression(rng, numbers, "+-*/", integer_steps=True)
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

    train, test = split_problems("countdown", seed, n, n_train, n_test, make)
    return Task("countdown", train, test, verify_countdown,
                normalize=lambda a: re.sub(r"\s+", "", a))


def verify_countdown(answer: str, problem: Problem) -> bool:
    """Correct iff the expression uses each number exactly once and equals the target."""
    return check_countdown(answer, problem.meta["numbers"], problem.meta["target"])
