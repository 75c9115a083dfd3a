"""Finding, verifying and pruning the checkpoints of a run.

A checkpoint is a directory `step_XXXXXXXX/` (written by every rank, one process or many:
nanoseek.parallel.dcp) holding
* `dcp/`: the model's and the optimizer's tensors in torch.distributed.checkpoint's format (one file per
  rank; it loads at any other layout),
* the trainer state (step, data position, RNG states, whatever the recipe adds) as `trainer_state.json`
  (plain values) + `trainer_state.tensors` (every tensor and array in it, in safetensors format),
* `checksums.json` (sha256 of every file), written last.

Nothing is unpickled: DCP's files hold raw tensor bytes, its metadata is read with torch's safe loader, and the
trainer state is JSON + safetensors (nanoseek.train.trainer_state), so a tampered checkpoint can at worst
hold wrong numbers, never execute code. The directory is written under a temporary name and renamed into
place, so a crash or a full disk never leaves a half-written checkpoint under a real name. A checkpoint whose
checksums fail is skipped with a warning; a checkpoint whose weights are not finite is never written.
Earlier nanoseek versions wrote single-process checkpoints with the model in HF format and the optimizer in
the trainer state; those still resume in one process (Trainer.load_single_file).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from nanoseek.errors import UserError, warn
from nanoseek.files import file_sha256
from nanoseek.parallel.dcp import CHECKSUMS  # written last by every checkpoint save


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------- writing
def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers holding NaN or inf."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def require_finite(model: torch.nn.Module, what: str) -> None:
    bad = nonfinite_tensors(model)
    if bad:
        raise UserError(f"refusing to write {what}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}); "
                        "the training diverged (lower lr or raise warmup_steps)")


def remove_partial(root: Path) -> None:
    """Remove temporary checkpoint directories a killed run left behind (they hold disk space)."""
    for p in root.glob(".step_*"):
        shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- finding
def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches its checksum, else what is wrong."""
    sums_file = path / CHECKSUMS
    if not sums_file.exists():
        return "no checksums.json (incomplete write)"
    try:
        sums = json.loads(sums_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "checksums.json is corrupt"
    if not isinstance(sums, dict):
        return "checksums.json is corrupt"
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if file_sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"skipping corrupt checkpoint {path}: {problem}")
    return None
