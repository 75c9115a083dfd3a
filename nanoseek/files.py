"""Crash-safe file writing and checksums: the one home for them.

Every file or directory nanoseek writes for later use goes through here, so a `kill -9` or a full disk
never leaves a half-written file under the final name: we write to a hidden temporary name beside the
target, fsync it, and `os.replace` it into place (atomic on POSIX within one filesystem). A failure
removes the temporary and raises `WriteError` (a `UserError`: the CLI prints one line, no traceback),
whatever the underlying exception was (`OSError` from the OS, `RuntimeError` from torch's or
safetensors' writers on ENOSPC).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from nanoseek.errors import UserError


class WriteError(UserError):
    """A file or directory could not be written (disk full, permissions, ...); nothing partial is left."""


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def temp_path(path: Path, suffix: str = ".tmp") -> Path:
    """Hidden sibling of `path` unique to this process: `.name.<pid>.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], None], what: str | None = None) -> Path:
    """Call `write(tmp)` to produce the file at a temporary path, then move it to `path`.
    On any failure the temporary is removed, `path` is untouched, and `WriteError` is raised."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError, ValueError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(f"could not write {what or path} ({_reason(e)})") from None
    fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_lines(path: str | Path, lines: Iterator[str] | list[str]) -> Path:
    """Write an iterable of lines (each without its newline) atomically, e.g. a JSONL file."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")

    return atomic_write(path, write)


@contextlib.contextmanager
def atomic_dir(path: str | Path, what: str | None = None) -> Iterator[Path]:
    """`with atomic_dir(final) as tmp:` fill `tmp`; on success it replaces `final` (an existing directory
    of that name is removed first), on failure it is removed and `final` is left as it was."""
    final = Path(path)
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                fsync_file(f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, RuntimeError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"could not write {what or final} ({_reason(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def file_sha256(path: str | Path, block: int = 1 << 23) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
