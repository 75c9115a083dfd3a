"""Pretraining text for R1-Zero-style experiments: a base model must sometimes produce the
`<think>...</think><answer>...</answer>` format for GRPO's rewards to have anything to reinforce.

Worked examples of *training-split* problems are written in several styles, as text found on the web
would be: the R1 format, the same reasoning followed by "The answer is N." (no answer tags), and several
examples run together (no stop after `</answer>`). No test problem appears: worked examples come from
the train split only, and synthetic-corpus documents that state a test problem's result are dropped.
"""

from __future__ import annotations

import random

from nanoseek.data.synthetic import synthetic_corpus
from nanoseek.r1.tasks import Problem, Task


def worked_example(problem: Problem, rng: random.Random, p_tags: float = 0.45) -> str:
    """One training problem as web text would show it: the reasoning in <think>, then the answer
    in <answer> tags (`p_tags` of the time) or in plain words."""
    q, a = problem.meta["compact"], problem.answer
    if rng.random() < p_tags:
        return f"Q: {q}\n<think>{q}={a}</think><answer>{a}</answer>"
    return f"Q: {q}\n<think>{q}={a}</think> The answer is {a}."


def task_documents(task: Task, n_docs: int, seed: int) -> list[str]:
    """Documents of 1 worked example (60%) or 2-4 run together (40%), from task.train only."""
    rng = random.Random(f"r1-zero-docs:{seed}")
    docs = []
    for _ in range(n_docs):
        k = 1 if rng.random() < 0.6 else rng.randint(2, 4)
        docs.append("\n".join(worked_example(rng.choice(task.train), rng) for _ in range(k)))
    return docs


def clean_corpus(n_docs: int, task: Task, seed: int) -> list[str]:
    """The built-in synthetic corpus without any document that states a test problem's result."""
    banned = {p.prompt_text.removeprefix("What is ").rstrip("?") + " =" for p in task.test}
    return [d for d in synthetic_corpus(n_docs, seed=seed) if not any(b in d for b in banned)]


def pretraining_corpus(task: Task, n_task_docs: int, n_corpus_docs: int, seed: int) -> list[str]:
    """Worked examples + general text, shuffled deterministically."""
    docs = task_documents(task, n_task_docs, seed) + clean_corpus(n_corpus_docs, task, seed)
    random.Random(seed).shuffle(docs)
    return docs


# ------------------------------------------------------------------ length growth (chain_sum)
# benchmarks/r1_length.py: a corpus in which longer reasoning pays. Chains of small numbers are worked
# either in one go ("3+5+8+2=18", as careless mental arithmetic: often wrong on long chains) or step by
# step with running sums ("3+5=8, 8+8=16, 16+2=18."), sometimes ending in a self-check
# ("check: 18-2=16."). The base model samples both; only the step-by-step traces are reliable on long
# chains, so R1-Zero's accuracy reward alone can make responses longer.

SELF_CHECK = "check:"


def running_sum_trace(terms: list[int], check: bool) -> str:
    """"3+5=8, 8+8=16, 16+2=18." and, with `check`, " check: 18-2=16." (undo the last step)."""
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}")
        total += t
    text = ", ".join(steps) + "."
    if check:
        text += f" {SELF_CHECK} {total}-{terms[-1]}={total - terms[-1]}."
    return text


def direct_error_rate(n_terms: int) -> float:
    """How often a one-go answer in the corpus is off: never for two numbers, then 15 points more
    per number, at most 60% (a long chain added in one's head)."""
    return min(0.6, 0.15 * (n_terms - 2))


def chain_sum_example(problem: Problem, rng: random.Random, p_steps: float, p_check: float) -> str:
    """One chain_sum training problem in the R1 format, worked step by step (`p_steps` of the time;
    `p_check` of those end with a self-check) or answered in one go, as often wrong as
    `direct_error_rate` says."""
    terms, q = problem.meta["terms"], problem.meta["compact"]
    total = sum(terms)
    if rng.random() < p_steps:
        think = running_sum_trace(terms, check=rng.random() < p_check)
        return f"Q: {q}\n<think>{think}</think><answer>{total}</answer>"
    if rng.random() < direct_error_rate(len(terms)):
        total = max(1, total + rng.choice([-3, -2, -1, 1, 2, 3]))
    return f"Q: {q}\n<think>{q}={total}</think><answer>{total}</answer>"


def length_corpus(task: Task, n_task_docs: int, n_corpus_docs: int, seed: int, p_steps: float = 0.3,
                  p_check: float = 0.3) -> list[str]:
    """chain_sum worked examples of training problems (one per document) + the synthetic corpus
    without test results, shuffled deterministically."""
    rng = random.Random(f"r1-length-docs:{seed}")
    docs = [chain_sum_example(rng.choice(task.train), rng, p_steps, p_check) for _ in range(n_task_docs)]
    docs += clean_corpus(n_corpus_docs, task, seed)
    random.Random(seed).shuffle(docs)
    return docs


def has_self_check(think: str | None) -> bool:
    return bool(think) and SELF_CHECK in think
