"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes its own shards of
the weights and of the optimizer state, in parallel, with no full copy anywhere.

A checkpoint directory holds `dcp/` (DCP's `.metadata` + one `.distcp` file per rank), whatever the trainer
adds through `write_extra` (rank 0: step, data position, RNG...), and `checksums.json` (sha256 of every
file), written last. The directory is filled under a hidden temporary name and renamed into place by rank 0
after every rank has finished, so a crash mid-save never leaves a directory under a real name: the
rename is the completion marker, and the checksums catch later damage.

Loading never unpickles more than plain data (nanoseek.dcp_safe; torch's own reader would unpickle
the metadata file and every non-tensor value in full). DCP records global shapes and each shard's offsets,
so a checkpoint loads at another world size or layout (resharding): FSDP shards and EP expert shards are
re-cut on load. The final model is gathered from the
shards to rank 0 (`full_model_state`) and written in the usual HF format.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from nanoseek.errors import UserError
from nanoseek.files import WriteError, file_sha256, fsync_dir, fsync_file
from nanoseek.dcp_safe import (
    SHARDS,
    SafeLoadPlanner,
    SafeReader,
    UnsafeCheckpointError,
    error_causes,
    read_failure,
    read_metadata_safely,
)

CHECKSUMS = "checksums.json"
# The optimizer state keyed by parameter name ("state.<name>.exp_avg"): with pipeline stages every rank holds
# other parameters, and torch's default keys the state by index within lists of names per group, which DCP
# would merge across ranks (one stage's list wins).
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# The hyperparameters ("param_groups.<name>.lr", betas, eps, ... for every parameter) are not saved: the run's
# config rebuilds them (the schedule sets lr at every step), and as one small pickled value each they were 3
# in 4 of a checkpoint's items and most of its write time.
HYPERPARAMETERS = "param_groups."


def _moments(optim_state: dict) -> dict:
    return {k: v for k, v in optim_state.items() if not k.startswith(HYPERPARAMETERS)}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def save_sharded(final: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 write_extra: Callable[[Path], None]) -> Path:
    """Every rank: write checkpoint `final` (model + optimizer shards); rank 0 adds `write_extra(tmp)`
    and the checksums, then renames the finished directory into place. A failed write (a full disk,
    permissions) is a `WriteError`; the temporary directory is left for the caller to remove."""
    tmp = final.with_name(f".{final.name}.dist.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    try:
        dcp.save({"model": model_state, "optimizer": _moments(optim_state)}, checkpoint_id=tmp / SHARDS)
    except (OSError, CheckpointException) as e:  # DCP gathers every rank's error into one CheckpointException
        raise WriteError(f"could not write checkpoint {final.name} ({_failure(e)})") from None
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        try:
            _finish(tmp, final, write_extra)
        except (OSError, RuntimeError, ValueError) as e:  # safetensors reports ENOSPC as a RuntimeError
            raise WriteError(f"could not write checkpoint {final.name} ({_failure(e)})") from None
    dist.barrier()
    return final


def _finish(tmp: Path, final: Path, write_extra: Callable[[Path], None]) -> None:
    """Rank 0, once every shard is on disk: the trainer's files, the checksums, the rename into place."""
    write_extra(tmp)
    for f in _files(tmp):
        fsync_file(f)
    sums = {str(f.relative_to(tmp)): file_sha256(f) for f in _files(tmp)}
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    fsync_file(tmp / CHECKSUMS)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _failure(error: BaseException) -> str:
    """One line on a failed write."""
    error = error_causes(error)[0]
    text = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
    return text[:200]


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank: read checkpoint `path` into the (already parallelized) model and optimizer, whatever
    the layout it was saved with. Nothing in the checkpoint is unpickled beyond plain data
    (nanoseek.dcp_safe); a file that asks for more, or that does not fit the model, is a UserError."""
    try:
        _load_sharded(path, model, optimizer)
    except (UnsafeCheckpointError, CheckpointException, OSError) as e:
        raise UserError(f"checkpoint {path}: {read_failure(e)}") from None


def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    stateless = stateless_parameters(path, optim_state)
    wanted = {k: v for k, v in _moments(optim_state).items() if parameter_of(k) not in stateless}
    state = {"model": model_state, "optimizer": wanted}
    dcp.load(state, storage_reader=SafeReader(str(path / SHARDS)), planner=SafeLoadPlanner())
    optim_state.update(state["optimizer"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_state, options=OPTIONS)
    by_name = dict(model.named_parameters())
    for name in stateless:  # as in the run that saved it: AdamW creates their state at their first gradient
        optimizer.state.pop(by_name[name], None)


def parameter_of(key: str) -> str | None:
    """'state.<parameter name>.<field>' -> the parameter name; None for other optimizer keys."""
    return key[len("state."):].rsplit(".", 1)[0] if key.startswith("state.") else None


def stateless_parameters(path: Path, optim_state: dict) -> set[str]:
    """Parameters with no optimizer state at all in checkpoint `path`: those that had not received a gradient
    when it was saved (e.g. modules a recipe never runs). AdamW creates state lazily, but torch's
    `get_state_dict` creates it for every parameter before a load, so without this the load would ask the
    checkpoint for keys it never had. A parameter with only some of its fields saved still fails the load."""
    saved = {k.removeprefix("optimizer.") for k in read_metadata_safely(path / SHARDS).state_dict_metadata}
    names = {parameter_of(k) for k in optim_state} - {None}
    have = {parameter_of(k) for k in saved}
    return names - have


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank: gather the full (unsharded) weights; rank 0 gets them on CPU, the others an empty dict."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
