"""The peak FLOP/s that model-FLOPs utilisation (MFU) is measured against.

MFU = achieved model FLOP/s / the device's peak. The peak comes, in this order, from `peak_tflops` in the
config, from the bundled hardware table (nanoseek/configs/hardware.json) matched on the CUDA device's
name and the training precision, or, on CPU, from a rough core-count estimate. A GPU that is not in the
table gets no MFU (a warning says so once) rather than a number computed against the wrong chip."""

from __future__ import annotations

import os

import torch

from nanoseek.cost.hardware import peak_flops_for_device
from nanoseek.errors import warn


def cpu_peak_flops() -> float:
    """cores x 3 GHz x 2 FMA units x 16 fp32 lanes (AVX-512) x 2 FLOPs per FMA: an order of magnitude."""
    return (os.cpu_count() or 1) * 3e9 * 2 * 16 * 2


def peak_flops(device: torch.device, autocast: torch.dtype | None, peak_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s for MFU, or None when unknown (then MFU is not reported)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type == "cpu":
        return cpu_peak_flops()
    if device.type != "cuda":
        warn(f"no peak FLOP/s known for device {device.type}: MFU is not reported (set peak_tflops=...)")
        return None
    name = torch.cuda.get_device_name(device)
    precision = "bf16" if autocast == torch.bfloat16 else "fp32"
    peak = peak_flops_for_device(name, precision)
    if peak is None:
        warn(f"GPU {name!r} ({precision}) is not in the hardware table: MFU is not reported "
             "(set peak_tflops=... to measure it)")
    return peak
