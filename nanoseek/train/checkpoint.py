"""Atomic, verifiable checkpoints.

A checkpoint is a directory `step_XXXXXXXX/` holding the model in HF format (config.json + safetensors),
`trainer_state.pt` (optimizer, step, data position, RNG states, whatever the caller adds) and
`checksums.json` (sha256 of every file). It is written under a temporary name, fsynced, and renamed into
place, so a crash or a full disk never leaves a half-written checkpoint under a real name. On resume a
checkpoint whose checksums fail is skipped with a warning, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from nanoseek.errors import UserError
from nanoseek.hf import save_pretrained

CHECKSUMS = "checksums.json"
STATE = "trainer_state.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, model, state: dict[str, Any], extra_files: dict[str, Path] | None = None,
                    keep_last: int = 3) -> Path:
    """Write checkpoint `step` under `root` atomically; prune to the newest `keep_last`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_pretrained(model, tmp)
        torch.save(state, tmp / STATE)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        sums = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            sums[f.name] = _sha256(f)
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final.name} ({e.strerror or e}); "
                        "the previous checkpoints are intact") from None
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches its checksum, else what is wrong."""
    sums_file = path / CHECKSUMS
    if not sums_file.exists():
        return "no checksums.json (incomplete write)"
    try:
        sums = json.loads(sums_file.read_text())
    except json.JSONDecodeError:
        return "checksums.json is corrupt"
    for name, digest in sums.items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping corrupt checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE, weights_only=False)
