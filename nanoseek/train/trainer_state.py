"""The trainer state of a checkpoint, stored without pickle.

Optimizer moments, the step, the data position, RNG states and whatever a recipe adds are split into
`trainer_state.json` (plain values) and `trainer_state.tensors` (every tensor and numpy array, in
safetensors format). Loading reads only JSON and safetensors, so a tampered checkpoint can at worst hold
wrong numbers, never execute code; a pickle can, whatever checksum sits beside it. A checkpoint written
in another format (format 1 pickled `trainer_state.pt`) is one clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanoseek.errors import UserError

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.tensors"  # safetensors format; not *.safetensors, which are model shards
LEGACY_STATE = "trainer_state.pt"  # format 1: a pickle, refused
FORMAT = "nanoseek-trainer-state"
FORMAT_VERSION = 2


class StateEncoder:
    """Splits a nested trainer state into JSON-able values and a flat dict of tensors.

    Allowed leaves: None, bool, int, float, str, torch tensors and numpy arrays. Containers: dict, list,
    tuple. Tensors and arrays become {"__tensor__": key} / {"__ndarray__": key, "dtype": ...}; tuples
    {"__tuple__": [...]}; dicts whose keys are not plain strings (the optimizer's integer parameter ids)
    {"__items__": [[key, value], ...]}."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _add(self, t: torch.Tensor) -> str:
        key = f"t{len(self.tensors)}"
        t = t.detach().cpu()
        whole = t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size()
        self.tensors[key] = t if whole else t.clone()  # safetensors refuses views of shared storage
        return key

    def encode(self, obj: Any, where: str = "state") -> Any:
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self._add(obj)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "iubf":
                raise TypeError(f"{where}: cannot store a numpy array of dtype {obj.dtype}")
            wide = obj.astype(np.float64 if obj.dtype.kind == "f" else np.int64)
            return {"__ndarray__": self._add(torch.from_numpy(wide)), "dtype": str(obj.dtype)}
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            return obj.item()
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.encode(v, f"{where}.{k}") for k, v in obj.items()}
            return {"__items__": [[self.encode(k, where), self.encode(v, f"{where}[{k!r}]")]
                                  for k, v in obj.items()]}
        raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint "
                        "(state_dict() must return plain values, tensors and arrays)")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `StateEncoder.encode`. Only the tags above are recognised; anything else is corrupt."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tags = [k for k in obj if k.startswith("__")]
    if not tags:
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    tag = tags[0]
    if tag == "__tensor__":
        return tensors[obj[tag]]
    if tag == "__ndarray__":
        return tensors[obj[tag]].numpy().astype(np.dtype(obj["dtype"]))
    if tag == "__tuple__":
        return tuple(decode_state(v, tensors) for v in obj[tag])
    if tag == "__items__":
        return {_hashable(decode_state(k, tensors)): decode_state(v, tensors) for k, v in obj[tag]}
    raise ValueError(f"unknown entry {tag!r}")


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def write_trainer_state(folder: Path, state: dict[str, Any]) -> None:
    encoder = StateEncoder()
    encoded = encoder.encode(state)
    save_file(encoder.tensors, str(folder / STATE_TENSORS))
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "state": encoded}
    (folder / STATE_JSON).write_text(json.dumps(doc), encoding="utf-8")


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path`, read from JSON and safetensors only (never unpickled).
    A checkpoint of another format, or an unreadable one, is one UserError."""
    if not (path / STATE_JSON).is_file():
        if (path / LEGACY_STATE).exists():
            raise UserError(f"checkpoint {path} has a pickled trainer state ({LEGACY_STATE}, format 1), which "
                            f"nanoseek no longer loads (unpickling can run code); this version reads format "
                            f"{FORMAT_VERSION}: start a new run (another out_dir)")
        raise UserError(f"checkpoint {path} has no {STATE_JSON}")
    try:
        doc = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"checkpoint {path}: {STATE_JSON} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"checkpoint {path}: {STATE_JSON} is not a nanoseek trainer state")
    if doc.get("version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has trainer-state format version {doc.get('version')!r}; this "
                        f"nanoseek reads version {FORMAT_VERSION}: start a new run (another out_dir)")
    try:
        tensors = load_file(str(path / STATE_TENSORS))
        state = decode_state(doc.get("state"), tensors)
    except (OSError, SafetensorError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint {path}: unreadable trainer state ({e})") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path}: unreadable trainer state")
    return state
