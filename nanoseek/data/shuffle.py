"""Per-epoch shuffling: the one home for "visit n items in a fresh seeded order every epoch".

The order of epoch e depends only on (seed, e, stream), never on how far a run got or how it was
resumed, so a resumed run visits exactly the items an uninterrupted one would. `stream` names an
independent sequence of orders (e.g. "sft", "grpo-prompts"), so two consumers sharing one seed do not
walk their data in lock-step; the default (no stream) is the pretraining loader's order.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _stream_key(stream: str) -> int:
    return int.from_bytes(hashlib.sha256(stream.encode("utf-8")).digest()[:8], "little")


def epoch_permutation(n: int, seed: int, epoch: int, stream: str | None = None) -> np.ndarray:
    """A permutation of range(n) for this epoch, from numpy's PCG64 seeded with (seed, epoch[, stream]).
    Negative seeds are folded into 64 bits (numpy's seed sequences take non-negative integers)."""
    key = [seed % 2**64, epoch]
    if stream is not None:
        key.append(_stream_key(stream))
    return np.random.default_rng(key).permutation(n)


class EpochOrder:
    """Maps a position in the endless sequence epoch 0, epoch 1, ... to an item index in [0, n):
    `order[position]`. Only the current epoch's permutation is kept; with `shuffle=False` the
    order is simply 0, 1, ..., n-1 every epoch."""

    def __init__(self, n: int, seed: int, stream: str | None = None, shuffle: bool = True):
        if n < 1:
            raise ValueError(f"EpochOrder needs at least one item, got n={n}")
        self.n, self.seed, self.stream, self.shuffle = n, seed, stream, shuffle
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = (epoch_permutation(self.n, self.seed, epoch, self.stream) if self.shuffle
                          else np.arange(self.n))
            self._epoch = epoch
        return self._perm

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        return int(self.permutation(epoch)[offset])
