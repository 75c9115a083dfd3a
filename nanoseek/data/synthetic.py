"""A small deterministic English-and-arithmetic corpus for tests, the demo and the experiments, with
no downloads.

The building blocks are public so experiments can compose their own corpora from the same
vocabulary (e.g. benchmarks/context_extension.py): the word lists, `sentence` (one simple English
sentence, sometimes a word problem), `arithmetic_fact` ("12 + 7 = 19.") and `statement` (one of the
two, drawn with the corpus's FACT_SHARE).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from nanoseek.errors import UserError
from nanoseek.files import write_lines

NAMES = ["Alice", "Bob", "Tom", "Mia", "Sam", "Lily", "Max", "Emma", "Leo", "Zoe", "Ben", "Ada"]
ANIMALS = ["cat", "dog", "bird", "fox", "horse", "rabbit", "fish", "mouse", "duck", "bear"]
ADJECTIVES = ["small", "big", "red", "blue", "happy", "quiet", "fast", "old", "young", "green"]
OBJECTS = ["ball", "book", "apple", "box", "cup", "hat", "kite", "stone", "letter", "flower"]
VERBS = [("sees", "see"), ("likes", "like"), ("finds", "find"), ("takes", "take"),
         ("holds", "hold"), ("wants", "want"), ("draws", "draw"), ("moves", "move")]
INTRANSITIVE_VERBS = ["runs", "sleeps", "plays", "sings", "waits", "jumps", "rests", "hides"]
PLACES = ["in the park", "at home", "by the river", "in the garden", "at school", "near the house"]
TIMES = ["In the morning", "At night", "After lunch", "On Sunday", "Every day", "Later"]
FACT_SHARE = 0.3  # fraction of statements that are arithmetic facts


def sentence(rng: random.Random) -> str:
    """One simple English sentence; a quarter of them are small addition word problems."""
    name, other = rng.sample(NAMES, 2)
    adj, obj, place = rng.choice(ADJECTIVES), rng.choice(OBJECTS), rng.choice(PLACES)
    verb, verb_plural = rng.choice(VERBS)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{name} {verb} the {adj} {obj} {place}."
    if kind == 1:
        return f"The {adj} {rng.choice(ANIMALS)} {rng.choice(INTRANSITIVE_VERBS)} {place}."
    if kind == 2:
        return f"{rng.choice(TIMES)}, {name} and {other} {verb_plural} a {adj} {obj}."
    n, m = rng.randint(1, 9), rng.randint(1, 9)
    return f"{name} has {n} {obj}s and gets {m} more, so {name} has {n + m} {obj}s."


def arithmetic_fact(rng: random.Random) -> str:
    """One true fact: a sum or difference of numbers below 100, or a product of numbers below 13."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}."
    if op == "*":
        a, b = a % 13, b % 13
        return f"{a} * {b} = {a * b}."
    return f"{a} + {b} = {a + b}."


def statement(rng: random.Random) -> str:
    """An arithmetic fact with probability FACT_SHARE, else a sentence."""
    make = arithmetic_fact if rng.random() < FACT_SHARE else sentence
    return make(rng)


def synthetic_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """`n_docs` one-line documents of 2-6 statements each: all arithmetic facts (with probability
    FACT_SHARE) or all sentences. Deterministic in `seed`; no newlines inside a document, so it
    round-trips through text files in any `text_docs` mode."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        make = arithmetic_fact if rng.random() < FACT_SHARE else sentence
        docs.append(" ".join(make(rng) for _ in range(rng.randint(2, 6))))
    return docs


def write_corpus(docs: Iterable[str], path: str | Path) -> Path:
    """Save documents as jsonl (field "text") if the name ends in .jsonl, else as blank-line separated
    paragraphs: the formats `nanoseek.data.readers.iter_documents` reads back. Written atomically."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name (.jsonl, or any other for plain text)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        lines = (json.dumps({"text": doc}) for doc in docs)
    else:
        lines = (doc + "\n" for doc in docs)
    return write_lines(path, lines)
