"""Tokenizing documents for shards: each document's ids followed by EOS, in input order, on all cores.

Corpus text is encoded with control tokens split as plain text (`special=False` in
`Tokenizer.encode`): a web page that happens to contain "<|eos|>" or "<|system|>" must not inject
document boundaries or chat roles into pretraining. The only control token in a shard is the EOS this
module appends after each document. The reasoning tags (`<think>` ...) are single tokens either way.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from nanoseek.data.manifest import DTYPES
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.errors import UserError


def choose_dtype(vocab_size: int, dtype: str = "auto") -> str:
    """uint16 halves disk and memory traffic, and holds ids up to 65535."""
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in DTYPES:
        raise UserError(f"dtype must be auto, uint16 or uint32, got {dtype!r}")
    limit = np.iinfo(DTYPES[dtype]).max + 1
    if vocab_size > limit:
        raise UserError(f"the tokenizer has {vocab_size} tokens, which do not fit {dtype} "
                        f"(at most {limit}); use --dtype uint32 or auto")
    return dtype


def _encode_texts(tok: Tokenizer, dtype: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a chunk of documents, each followed by EOS: (flat ids, per-document lengths). One flat
    array pickles far faster than a list of lists when coming back from a worker."""
    encoded = tok.encode_batch(texts, special=False)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=DTYPES[dtype])
    pos = 0
    for ids, n in zip(encoded, lengths):
        flat[pos:pos + n - 1] = ids
        flat[pos + n - 1] = tok.eos_id
        pos += n
    return flat, lengths


_WORKER: tuple[Tokenizer, str] | None = None


def _init_worker(tokenizer_json: str, dtype: str) -> None:
    """Each worker builds its own tokenizer once; the parent handles Ctrl-C, and the Rust thread
    pool stays off so N workers use N cores, not N x N threads."""
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (Tokenizer.from_str(tokenizer_json), dtype)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_texts(*_WORKER, texts)


def _chunks(docs: Iterable[str], max_docs: int = 256, max_chars: int = 1 << 20) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def encode_documents(docs: Iterable[str], tok: Tokenizer, dtype: str, workers: int) -> Iterator[np.ndarray]:
    """Yield each document's ids (+ EOS) in input order. With workers > 1 chunks go to a process pool,
    at most 2 x workers in flight so memory stays bounded however large the corpus is (Pool.imap
    would read the whole input ahead). `spawn` avoids forking a process that runs Rust threads."""
    if workers <= 1:
        yield from _split_docs(_encode_texts(tok, dtype, c) for c in _chunks(docs))
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok.backend.to_str(), dtype))
    try:
        pending: deque = deque()
        for chunk in _chunks(docs):
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield from _split_docs([pending.popleft().get()])
        while pending:
            yield from _split_docs([pending.popleft().get()])
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _split_docs(results: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
    for flat, lengths in results:
        yield from np.split(flat, np.cumsum(lengths)[:-1])
