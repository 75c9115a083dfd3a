"""What a task is made of: `Problem` (one question with its reference answer) and `Task` (train and
test problems plus a verifier, called only through a time limit and an exception guard)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from nanoseek.r1.verify import VerifierStats, guarded_score

Verifier = Callable[[str, "Problem"], Any]  # returns bool or a float in [0, 1]


@dataclass
class Problem:
    """One question. `answer` is the reference answer (for countdown: one valid expression);
    `meta` holds what the verifier needs (countdown numbers/target) and the `compact` prompt."""

    prompt_text: str
    answer: str
    meta: dict = field(default_factory=dict)


def normalize_text(answer: str) -> str:
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
    normalize: Callable[[str], str] = normalize_text
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
