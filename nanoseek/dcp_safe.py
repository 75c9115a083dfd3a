"""Reading torch.distributed.checkpoint (DCP) directories without running code a checkpoint could carry.

DCP stores tensors as raw bytes (read back with `torch.load(weights_only=True)`), but two things in it are
pickles that torch unpickles in full: the `.metadata` file (`FileSystemReader.read_metadata`: `pickle.load`)
and every non-tensor value, such as an optimizer's learning rate (`DefaultLoadPlanner.load_bytes`:
`torch.load(weights_only=False)`). A checkpoint handed to `--resume` could therefore run code, and its
checksums do not help (whoever edits the files rewrites them). The two classes here close both doors:

* `SafeReader` unpickles `.metadata` with an allowlist: DCP's own metadata classes, `torch.Size`, torch
  dtypes and layouts, and paths. Anything else is refused before it is called.
* `SafeLoadPlanner` loads each non-tensor value with `weights_only=True` first (torch's restricted
  unpickler: plain numbers, strings, containers and tensors); only a value that passed is handed on.

`read_model_tensors` reads a training checkpoint's weights in one process, whatever layout wrote them, so a
checkpoint directory loads as a model (nanoseek.hf). It sits here, below nanoseek.parallel (which writes and
resumes these checkpoints), because loading a model must not depend on the distributed layer.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

SHARDS = "dcp"  # a training checkpoint's DCP folder (nanoseek.parallel.dcp writes it)
METADATA_FILE = ".metadata"
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup of torch.strided & co. by name
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # where a shard's bytes sit in its file
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked to load something that is not checkpoint data."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == dcp_metadata.__name__:  # DCP's metadata classes (dataclasses and enums), nothing imported
            obj = getattr(dcp_metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{module}.{name} is not checkpoint metadata")


def read_metadata_safely(folder: Path) -> Metadata:
    """`folder/.metadata` (a DCP checkpoint's index) unpickled with the allowlist above."""
    with open(Path(folder) / METADATA_FILE, "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{METADATA_FILE} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """torch's file-system reader, with the metadata read through the allowlist."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: a format nanoseek does not write
            raise UnsafeCheckpointError("per-rank DCP metadata is not supported")
        metadata = read_metadata_safely(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as torch's reader does
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """torch's default load planner; a non-tensor value must pass torch's restricted unpickler first."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        start = value.tell()
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"{read_item.dest_index.fqn}: {str(e).splitlines()[0]}") from None
        value.seek(start)
        super().load_bytes(read_item, value)  # the same bytes, now known to hold plain data only


def is_sharded(checkpoint: Path) -> bool:
    """Whether `checkpoint` holds a DCP folder (every training checkpoint nanoseek writes)."""
    return (Path(checkpoint) / SHARDS / METADATA_FILE).is_file()


def error_causes(error: BaseException) -> list[BaseException]:
    """The errors behind `error`: DCP gathers each failed rank's (exception, stack) into one CheckpointException
    (a BaseException, which `except Exception` would not catch)."""
    if isinstance(error, CheckpointException):
        found = [f[0] if isinstance(f, tuple) else f for f in error.failures.values()]
        return [e for e in found if isinstance(e, BaseException)] or [error]
    return [error]


def read_failure(error: BaseException) -> str:
    """One line on a failed read: refused content first, whichever rank met it."""
    causes = error_causes(error)
    error = next((e for e in causes if isinstance(e, UnsafeCheckpointError)), causes[0])
    if isinstance(error, UnsafeCheckpointError):
        return f"refusing to load it, it holds more than checkpoint data ({error})"
    line = (str(error).splitlines() or [type(error).__name__])[0][:200]
    return f"does not load into this run's model ({type(error).__name__}: {line})"


def read_model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's weights in training checkpoint `checkpoint`, as full CPU tensors by parameter name (the
    model's own names), read in this process alone. Raises UnsafeCheckpointError, CheckpointException or
    OSError (callers word them with `read_failure`)."""
    folder = Path(checkpoint) / SHARDS
    metadata = read_metadata_safely(folder)
    tensors = {key.removeprefix("model."): torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": reading alone is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": tensors}, storage_reader=SafeReader(str(folder)), planner=SafeLoadPlanner(), no_dist=True)
    return tensors
