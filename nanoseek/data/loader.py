"""`TokenLoader`: packed, shuffled, resumable batches from a prepared data directory.

The split's shards are concatenated into one token stream and cut into non-overlapping `seq_len`
windows (documents are packed, separated by EOS); the window order is reshuffled every epoch from
`seed` (`nanoseek.data.shuffle`), and each step yields a `LongTensor[batch_size, seq_len]`. Its
`state_dict()` is one counter, so a resumed run continues at exactly the next window.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nanoseek.data.manifest import check_shards, read_manifest
from nanoseek.data.shuffle import EpochOrder
from nanoseek.errors import UserError


class TokenLoader:
    """Packed, shuffled, resumable batches from a prepared data directory.

    The split's shards form one token stream, cut into `num_windows = num_tokens // seq_len`
    non-overlapping windows (the tail shorter than a window is unused). Windows are visited in a
    fresh permutation each epoch, drawn from (seed, epoch), so the order depends on nothing else.
    Each step takes the next `batch_size * world_size` windows of that endless sequence (a batch may
    straddle two epochs) and this rank keeps its `batch_size` of them. Batches are
    `LongTensor[batch_size, seq_len]`; the model shifts labels itself.

    `state_dict()` is essentially the number of windows consumed, so resuming, even with another
    batch size or world size, continues exactly where training stopped. With `epochs` set iteration
    stops after that many passes, and the last batch may be smaller.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        seq_len: int = 1024,
        batch_size: int = 8,
        seed: int = 0,
        shuffle: bool = True,
        verify: bool = True,
        epochs: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        device=None,
    ):
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        if split not in self.manifest["splits"]:
            raise UserError(f"unknown split {split!r}; {data_dir} has {list(self.manifest['splits'])}")
        # sizes of this split always; with `verify`, the checksums of every split, so the data a
        # run evaluates on (the val split, often opened with verify=False) is checked as well
        for name in self.manifest["splits"] if verify else [split]:
            check_shards(self.data_dir, self.manifest, name, verify)
        self.split, self.seq_len, self.batch_size, self.seed = split, seq_len, batch_size, seed
        self.shuffle, self.epochs, self.rank, self.world_size = shuffle, epochs, rank, world_size
        self.device = device
        self._open_shards()
        self.num_windows = self.num_tokens // seq_len
        if self.num_windows == 0:
            hint = " (raise --val-fraction)" if split == "val" else ""
            raise UserError(f"the {split} split of {data_dir} has {self.num_tokens} tokens, fewer than "
                            f"one sequence of {seq_len}{hint}")
        self.consumed = 0  # windows taken from the endless shuffled sequence, over all ranks
        self._order = EpochOrder(self.num_windows, seed, shuffle=shuffle)

    def _open_shards(self) -> None:
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        shards = [s for s in self.manifest["splits"][self.split]["shards"] if s["num_tokens"]]
        self._maps = [np.memmap(self.data_dir / s["file"], dtype=dtype, mode="r") for s in shards]
        self._starts = np.cumsum([0] + [s["num_tokens"] for s in shards])
        self.num_tokens = int(self._starts[-1])

    # ---- facts about the data --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer_sha256"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.data_dir / self.manifest["tokenizer_dir"]

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_windows

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_windows / (self.batch_size * self.world_size))

    # ---- batches ---------------------------------------------------------------------------------
    def _window_index(self, position: int) -> int:
        return self._order[position]

    def _read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + len(out)) of the split's stream, across shard ends, into out."""
        pos, filled = start, 0
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while filled < len(out):
            begin = pos - self._starts[shard]
            piece = self._maps[shard][begin:begin + len(out) - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            pos += len(piece)
            shard += 1

    def next_batch(self):
        """The next `LongTensor[batch_size, seq_len]`; StopIteration once `epochs` are done."""
        import torch

        step = self.batch_size * self.world_size
        end = self.consumed + step
        if self.epochs is not None:
            end = min(end, self.epochs * self.num_windows)
        mine = range(self.consumed + self.rank * self.batch_size,
                     min(self.consumed + (self.rank + 1) * self.batch_size, end))
        if len(mine) == 0:
            raise StopIteration
        batch = np.empty((len(mine), self.seq_len), dtype=np.int64)
        for row, position in enumerate(mine):
            self._read(self._window_index(position) * self.seq_len, batch[row])
        self.consumed = self.consumed + step if end - self.consumed == step else end
        tensor = torch.from_numpy(batch)
        if self.device is not None:
            device = torch.device(self.device)
            if device.type == "cuda":
                tensor = tensor.pin_memory()
            tensor = tensor.to(device, non_blocking=True)
        return tensor

    def __iter__(self):
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    # ---- resuming --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_tokens": self.num_tokens,
            "tokenizer_sha256": self.tokenizer_sha256,
            "consumed_windows": self.consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved loader stopped. The data and the ordering settings must match,
        or the position would point at different tokens; a mismatch is a UserError naming it."""
        for key in ("split", "seq_len", "seed", "shuffle", "num_tokens", "tokenizer_sha256"):
            if state.get(key) != getattr(self, key):
                raise UserError(f"cannot resume the data loader: {key} was {state.get(key)!r} when "
                                f"saved, now {getattr(self, key)!r}")
        self.consumed = int(state["consumed_windows"])

    def __repr__(self) -> str:
        return (f"TokenLoader({str(self.data_dir)!r}, split={self.split!r}, tokens={self.num_tokens}, "
                f"seq_len={self.seq_len}, batch_size={self.batch_size}, epoch={self.epoch})")
