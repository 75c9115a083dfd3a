"""The bundled hardware table (nanoseek/configs/hardware.json): peak FLOP/s, SMs, memory and price
per GPU, looked up by the table's names (`--gpu H800`) or by a CUDA device name
(`torch.cuda.get_device_name()`, e.g. "NVIDIA A100-SXM4-80GB") for the trainer's MFU."""

from __future__ import annotations

import re
from typing import Any

from nanoseek.cost.models import HARDWARE_FILE, read_json_object
from nanoseek.errors import UserError

PRECISIONS = ("bf16", "fp8", "fp32")


def load_hardware() -> dict[str, dict[str, Any]]:
    """GPU name -> its row of the table (comment entries, which start with "_", left out)."""
    return {k: v for k, v in read_json_object(HARDWARE_FILE).items() if not k.startswith("_")}


def gpu_spec(gpu: str) -> dict[str, Any]:
    """The table row of a GPU named as in the table (case-insensitive); UserError listing them."""
    hw = load_hardware()
    match = {k.lower(): k for k in hw}.get(gpu.lower())
    if match is None:
        raise UserError(f"unknown GPU {gpu!r}; choose one of: {', '.join(hw)}")
    return hw[match]


def peak_flops(gpu: str, precision: str = "bf16", comm_sms: int = 0) -> float:
    """Dense peak FLOP/s of one GPU, scaled by the share of SMs left for compute."""
    spec = gpu_spec(gpu)
    tflops = spec.get(f"{precision.lower()}_tflops")
    if tflops is None:
        raise UserError(f"{gpu} has no {precision} peak in hardware.json")
    if not 0 <= comm_sms < spec["sms"]:
        raise UserError(f"invalid setting `--comm-sms` = {comm_sms}: must be in [0, {spec['sms']}) "
                        f"for {gpu}")
    return tflops * 1e12 * (spec["sms"] - comm_sms) / spec["sms"]


def usd_per_gpu_hour(gpu: str) -> float | None:
    return gpu_spec(gpu).get("usd_per_gpu_hour")


def _words(name: str) -> list[str]:
    return re.split(r"[\s\-_/]+", name.strip().lower())


def gpu_for_device(device_name: str) -> str | None:
    """The table name a CUDA device name refers to: the longest table name whose words appear
    consecutively in the device name ("NVIDIA H100 PCIe" -> "H100 PCIe", "NVIDIA H100 80GB HBM3" ->
    "H100", "NVIDIA A100-SXM4-80GB" -> "A100"); None when none does ("NVIDIA GH200" is no H200)."""
    words = _words(device_name)
    best = None
    for gpu in load_hardware():
        key = _words(gpu)
        if any(words[i:i + len(key)] == key for i in range(len(words) - len(key) + 1)):
            if best is None or len(key) > len(_words(best)):
                best = gpu
    return best


def peak_flops_for_device(device_name: str, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s of the GPU `torch.cuda.get_device_name()` calls `device_name`, at `precision`
    ("bf16", "fp8" or "fp32"); None when the GPU is not in the table or has no peak at that
    precision, so MFU is left unreported rather than computed against the wrong chip."""
    gpu = gpu_for_device(device_name)
    if gpu is None:
        return None
    tflops = load_hardware()[gpu].get(f"{precision.lower()}_tflops")
    return tflops * 1e12 if tflops else None
