"""Writing token shards: `{split}_{i:06d}.bin` files of raw little-endian ids, hashed as they are
written, under hidden `.partial` names until `commit()` moves them into place. A write the disk
refuses is a `WriteError` (one line); `abort()` then removes every partial file."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np

from nanoseek.files import WriteError

PARTIAL_SUFFIX = ".partial"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def is_shard_name(name: str, splits) -> bool:
    """True for the names `shard_name` produces (`train_000012.bin`), and no others."""
    stem, _, rest = name.partition("_")
    return stem in splits and len(rest) == 10 and rest.endswith(".bin") and rest[:6].isdigit()


def remove_partials(out: Path, splits) -> list[Path]:
    """Delete the `.partial` shards a killed `prepare` left in `out` (hidden `.train_000000.bin.<pid>
    .partial` files; nothing else), so they stop holding disk space. Returns what was removed."""
    removed = []
    for path in out.glob(f".*{PARTIAL_SUFFIX}"):
        name = path.name[1:].split(".bin.")[0] + ".bin"
        if is_shard_name(name, splits) and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


class ShardWriter:
    """Appends token ids to one split's shards of `shard_tokens` tokens each. Files are written under
    temporary names; `commit()` gives them their final names, `abort()` removes them."""

    def __init__(self, out: Path, split: str, dtype: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self._disk_dtype = np.dtype(dtype).newbyteorder("<")
        self.shards: list[dict] = []  # {"file", "num_tokens", "sha256"}
        self._tmp: list[Path] = []  # temporary path of each shard until committed
        self.num_tokens = 0
        self.num_docs = 0
        self._file = None
        self._hash = None

    def write_doc(self, ids: np.ndarray) -> None:
        """Append one document's ids; WriteError (one line) if the disk refuses them."""
        with self._reporting():
            self._write_doc(ids)

    @contextlib.contextmanager
    def _reporting(self):
        try:
            yield
        except OSError as e:  # ENOSPC, most likely
            shard = self.shards[-1]["file"] if self.shards else self.split
            raise WriteError(f"could not write {self.out / shard} ({e.strerror or e})") from None

    def _write_doc(self, ids: np.ndarray) -> None:
        self.num_docs += 1
        while len(ids):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self.shards[-1]["num_tokens"]
            piece, ids = ids[:room], ids[room:]
            data = np.ascontiguousarray(piece, dtype=self._disk_dtype).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self.shards[-1]["num_tokens"] += len(piece)
            self.num_tokens += len(piece)
            if self.shards[-1]["num_tokens"] == self.shard_tokens:
                self._close()

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        tmp = self.out / f".{name}.{os.getpid()}{PARTIAL_SUFFIX}"
        self.shards.append({"file": name, "num_tokens": 0, "sha256": ""})
        self._tmp.append(tmp)
        self._file = open(tmp, "wb")
        self._hash = hashlib.sha256()

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._file = None

    def finish(self) -> dict:
        """Flush the last shard; return this split's manifest entry (shards still under temp names)."""
        with self._reporting():
            self._close()
        return {"num_tokens": self.num_tokens, "num_docs": self.num_docs, "shards": self.shards}

    def commit(self) -> None:
        """Rename the finished shards into place."""
        for shard, tmp in zip(self.shards, self._tmp):
            os.replace(tmp, self.out / shard["file"])
        self._tmp = []

    def abort(self) -> None:
        """Remove every temporary shard. Never raises: on a full disk closing the open file can fail
        again (its buffer cannot be flushed), and the files must still go."""
        if self._file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._file.close()
            self._file = None
        for tmp in self._tmp:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self._tmp = []
