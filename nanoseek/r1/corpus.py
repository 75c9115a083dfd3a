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
