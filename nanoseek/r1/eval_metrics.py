"""Evaluation metrics for reasoning models: pass@k, majority voting, and a summary table.

pass@k uses the unbiased estimator of Chen et al. (2021) from n >= k samples of which c are correct
(sampling exactly k and checking "any correct" has high variance and is biased for small n). R1
reports pass@1 averaged over k samples at temperature > 0 and maj@k (consensus of k samples);
both are here, plus greedy accuracy, format rate and mean response length.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Hashable, Sequence

from nanoseek.errors import UserError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples, drawn without replacement from n of which c are
    correct, is correct: 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise UserError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority_vote(answers: Sequence[str | None],
                  key: Callable[[str], Hashable] | None = None) -> str | None:
    """Most common answer (None = no answer, ignored); ties go to the answer seen first. With `key`,
    answers vote by `key(answer)` (e.g. "7.0" and "7" together) and the first such answer is
    returned. None if no sample answered."""
    key = key or (lambda a: a)
    counts: Counter = Counter()
    first: dict[Hashable, str] = {}
    for a in answers:
        if a is None:
            continue
        vote = key(a)
        counts[vote] += 1
        first.setdefault(vote, a)
    if not counts:
        return None
    best = max(counts.values())
    winner = next(v for v in first if counts[v] == best)  # dicts keep insertion order
    return first[winner]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int | None = None,
             key: Callable[[str], Hashable] | None = None) -> float:
    """1.0 if the majority answer of the first k samples is correct, else 0.0. `correct[i]` is the
    verifier's verdict on `answers[i]`; the vote's verdict is that of the first sample voted for."""
    if len(answers) != len(correct):
        raise UserError(f"maj@k: {len(answers)} answers but {len(correct)} verdicts")
    k = len(answers) if k is None else k
    if not 1 <= k <= len(answers):
        raise UserError(f"maj@k needs 1 <= k <= {len(answers)} samples, got k={k}")
    winner = majority_vote(answers[:k], key)
    if winner is None:
        return 0.0
    return 1.0 if correct[list(answers[:k]).index(winner)] else 0.0


@dataclass
class Sample:
    """One generated completion, already checked."""

    answer: str | None
    correct: bool
    well_formed: bool
    n_tokens: int


@dataclass
class EvalResult:
    """Summary of an evaluation over a test split. Rates are in [0, 1]; None = not measured."""

    task: str
    n_problems: int
    k: int
    greedy_accuracy: float | None
    pass_at_1: float | None
    pass_at_k: float | None
    maj_at_k: float | None
    format_rate: float
    mean_response_length: float
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_samples(cls, task: str, samples: Sequence[Sequence[Sample]],
                     greedy: Sequence[Sample] | None = None,
                     key: Callable[[str], Hashable] | None = None) -> EvalResult:
        """Summarize k sampled completions per problem (`samples[i]`) and/or one greedy completion
        per problem. pass@1 is the mean over problems of c/n (= pass@1 averaged over the k)."""
        if not samples and not greedy:
            raise UserError("nothing to evaluate: no samples and no greedy completions")
        k = len(samples[0]) if samples else 0
        if samples and (k == 0 or any(len(s) != k for s in samples)):
            raise UserError("every problem needs the same number (>= 1) of samples")
        every = [x for s in samples for x in s] + list(greedy or [])
        return cls(
            task=task,
            n_problems=len(samples) if samples else len(greedy),
            k=k,
            greedy_accuracy=_mean([x.correct for x in greedy]) if greedy else None,
            pass_at_1=_mean([pass_at_k(k, _c(s), 1) for s in samples]) if samples else None,
            pass_at_k=_mean([pass_at_k(k, _c(s), k) for s in samples]) if samples else None,
            maj_at_k=_mean([maj_at_k([x.answer for x in s], [x.correct for x in s], key=key)
                            for s in samples]) if samples else None,
            format_rate=_mean([x.well_formed for x in every]),
            mean_response_length=_mean([x.n_tokens for x in every]),
        )

    def rows(self) -> list[tuple[str, str]]:
        """(metric, value) pairs, in display order."""
        def pct(x):
            return "-" if x is None else f"{100 * x:.1f}%"

        k = self.k
        return [("task", self.task), ("problems", str(self.n_problems)),
                ("greedy accuracy", pct(self.greedy_accuracy)),
                (f"pass@1 (avg of {k})", pct(self.pass_at_1)), (f"pass@{k}", pct(self.pass_at_k)),
                (f"maj@{k}", pct(self.maj_at_k)), ("format rate", pct(self.format_rate)),
                ("mean response length", f"{self.mean_response_length:.1f} tokens")] + \
            [(str(n), str(v)) for n, v in self.extra.items()]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def to_markdown(self) -> str:
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in self.rows()]
        return "\n".join(lines)

    def to_rich_table(self):
        """A `rich.table.Table` for the terminal."""
        from rich.table import Table

        table = Table(title=f"eval: {self.task}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in self.rows():
            table.add_row(name, value)
        return table


def _c(samples: Sequence[Sample]) -> int:
    return sum(bool(x.correct) for x in samples)


def _mean(xs: Sequence[float]) -> float:
    return sum(float(x) for x in xs) / len(xs) if xs else 0.0
