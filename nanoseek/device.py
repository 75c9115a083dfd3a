"""Choosing the torch device from a user setting ("auto", "cpu", "cuda", "cuda:1", "mps")."""

from __future__ import annotations

import torch

from nanoseek.errors import SettingError

DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """"auto" = CUDA when available, else CPU. An unknown device type, or one this machine lacks, is one
    clear `SettingError` naming `setting`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise SettingError(f"invalid setting `{setting}` = {name!r}: must be auto, cpu, cuda[:N] or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"`{setting}` = {name!r}, but CUDA is not available on this machine "
                               "(use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingError(f"`{setting}` = {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SettingError(f"`{setting}` = {name!r}, but MPS is not available on this machine (use cpu or auto)")
    return device
