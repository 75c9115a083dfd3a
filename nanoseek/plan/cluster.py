"""The cluster a plan runs on: one GPU type from the hardware table (nanoseek/configs/hardware.json),
how many of them, and every table value overridable (HBM, link bandwidths, GPUs per node, price)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from nanoseek.cost.hardware import gpu_spec, load_hardware
from nanoseek.errors import UserError, is_finite_number, require
from nanoseek.plan.host import HostCosts


@dataclass(frozen=True)
class Cluster:
    gpu: str
    n_gpus: int
    gpus_per_node: int
    hbm_gb: float                  # memory per GPU as datasheets write it: "80 GB" of HBM is 80 GiB
    hbm_tb_s: float                # memory bandwidth per GPU, TB/s
    peak_tflops: dict[str, float]  # dense peak per precision ("bf16", "fp8", "fp32"); absent = no such units
    sms: int
    comm_sms: int                  # SMs kept for communication kernels (DeepSeek-V3: 20 of 132)
    nvlink_gb_s: float             # intra-node bandwidth per GPU per direction
    internode_gb_s: float          # network bandwidth per GPU per direction
    usd_per_gpu_hour: float | None
    source: str
    host: HostCosts | None = None  # host-side costs paid in line (a CPU); None on GPUs (hidden: nanoseek/plan/host.py)

    @property
    def nodes(self) -> int:
        return math.ceil(self.n_gpus / self.gpus_per_node)

    @property
    def hbm_bytes(self) -> float:
        """HBM capacities are binary: an "80 GB" H100/H800/A100 holds 80 x 2^30 = 85.9e9 bytes (nvidia-smi
        reports 81,920 MiB on an A100 80GB; drivers and ECC take a little of it: see the reserve)."""
        return self.hbm_gb * 2**30

    def peak_flops(self, precision: str) -> float:
        """Dense peak FLOP/s at `precision`, scaled by the SMs left for compute."""
        tflops = self.peak_tflops.get(precision)
        if tflops is None:
            raise UserError(f"{self.gpu} has no {precision} peak in hardware.json (choose another "
                            "--precision or GPU)")
        return tflops * 1e12 * (self.sms - self.comm_sms) / self.sms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OVERRIDES = ("bf16_tflops", "fp8_tflops", "hbm_gb", "hbm_tb_s", "nvlink_gb_s", "internode_gb_s", "gpus_per_node",
             "usd_per_gpu_hour")


def cluster(gpu: str = "H800", n_gpus: int = 8, *, comm_sms: int = 0, **overrides: Any) -> Cluster:
    """A `Cluster` of `n_gpus` GPUs of the table's type `gpu`; keyword overrides (None = the table's
    value): bf16_tflops, fp8_tflops, hbm_gb, hbm_tb_s, nvlink_gb_s, internode_gb_s, gpus_per_node,
    usd_per_gpu_hour."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"unknown cluster override(s): {', '.join(unknown)}")
    spec = gpu_spec(gpu)
    name = {k.lower(): k for k in load_hardware()}[gpu.lower()]
    row = {"hbm_gb": spec.get("memory_gb"), "hbm_tb_s": spec.get("hbm_tb_s"), "nvlink_gb_s": spec.get("nvlink_gb_s"),
           "internode_gb_s": spec.get("internode_gb_s"), "gpus_per_node": spec.get("gpus_per_node"),
           "usd_per_gpu_hour": spec.get("usd_per_gpu_hour")}
    row.update({k: v for k, v in overrides.items() if v is not None})
    require(isinstance(n_gpus, int) and n_gpus >= 1, "--gpus", n_gpus, "a positive integer")
    for key in ("hbm_gb", "hbm_tb_s", "nvlink_gb_s", "internode_gb_s"):
        require(is_finite_number(row[key]) and row[key] > 0, "--" + key.replace("_", "-"), row[key],
                "a positive number")
    require(isinstance(row["gpus_per_node"], int) and row["gpus_per_node"] >= 1, "--gpus-per-node",
            row["gpus_per_node"], "a positive integer")
    if row["usd_per_gpu_hour"] is not None:
        require(is_finite_number(row["usd_per_gpu_hour"]) and row["usd_per_gpu_hour"] >= 0,
                "--usd-per-gpu-hour", row["usd_per_gpu_hour"], "a finite number >= 0")
    require(isinstance(comm_sms, int) and 0 <= comm_sms < spec["sms"], "--comm-sms", comm_sms,
            f"an integer in [0, {spec['sms']}) for {name}")
    peaks = {p: spec[f"{p}_tflops"] for p in ("bf16", "fp8", "fp32") if spec.get(f"{p}_tflops")}
    for p in ("bf16", "fp8"):
        value = overrides.get(f"{p}_tflops")
        if value is not None:
            require(is_finite_number(value) and value > 0, f"--{p}-tflops", value, "a positive number")
            peaks[p] = float(value)
    source = spec.get("source", "")
    changed = [k for k in OVERRIDES if overrides.get(k) is not None]
    if changed:
        source += f"; overridden: {', '.join(changed)}"
    return Cluster(name, n_gpus, row["gpus_per_node"], float(row["hbm_gb"]), float(row["hbm_tb_s"]), peaks,
                   spec["sms"], comm_sms,
                   float(row["nvlink_gb_s"]), float(row["internode_gb_s"]), row["usd_per_gpu_hour"], source)
