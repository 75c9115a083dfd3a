"""FP8 mixed-precision training in DeepSeek-V3's fine-grained recipe (technical report §3.3; docs/fp8.md).

`fp8_model_build()` installs the FP8 linear (every projection built by nanoseek.model.linear) and the
FP8 grouped GEMM (routed experts) for the models built inside it; embedding, output head, router gate,
norms and the attention core stay in high precision as in V3. `fp8_unsupported(device)` says why a
device or torch build cannot do it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from nanoseek.errors import SettingError
from nanoseek.fp8.grouped import fp8_grouped_mm
from nanoseek.fp8.linear import FP8Linear, fp8_linear, fp8_linear_factory
from nanoseek.fp8.quantize import (FP8, FP8_MAX, TILE, dequantize_blocks, dequantize_tiles, quantize_blocks,
                                   quantize_tiles)
from nanoseek.model.linear import grouped_gemm, linear_factory, set_grouped_gemm, set_linear_factory

__all__ = ["FP8", "FP8_MAX", "TILE", "FP8Linear", "fp8_linear", "fp8_grouped_mm", "quantize_tiles",
           "quantize_blocks", "dequantize_tiles", "dequantize_blocks", "fp8_unsupported", "require_fp8",
           "fp8_model_build", "fp8_modules"]

MIN_CUDA_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm_89), Hopper (sm_90) and newer


def fp8_unsupported(device: torch.device) -> str | None:
    """Why FP8 GEMMs cannot run on `device` with this torch build, or None when they can (checked by
    running a tiny `torch._scaled_mm` there)."""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"this torch build ({torch.__version__}) has no float8_e4m3fn / torch._scaled_mm"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CUDA_CAPABILITY:
            return (f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]}) has no FP8 tensor cores "
                    "(sm_89 or newer needed)")
    elif device.type != "cpu":
        return f"FP8 GEMMs are implemented for cpu and cuda, not {device.type}"
    try:
        n = 16
        a = torch.ones(n, n, device=device).to(FP8)
        one = torch.ones(n, 1, device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one.t().contiguous(), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        return f"torch._scaled_mm does not run on {device} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def require_fp8(device: torch.device) -> None:
    """One SettingError when `fp8=true` cannot run on `device`."""
    reason = fp8_unsupported(device)
    if reason:
        raise SettingError(f"invalid setting `fp8` = True: FP8 training needs float8 GEMMs, but {reason}; "
                           "use fp8=false")


@contextlib.contextmanager
def fp8_model_build(enabled: bool = True) -> Iterator[None]:
    """Models built inside this block get FP8 projections and FP8 routed experts (nothing when
    `enabled` is False). The previous factories are restored on exit."""
    if not enabled:
        yield
        return
    previous = linear_factory(), grouped_gemm()
    set_linear_factory(fp8_linear_factory)
    set_grouped_gemm(fp8_grouped_mm)
    try:
        yield
    finally:
        set_linear_factory(previous[0])
        set_grouped_gemm(previous[1])


def fp8_modules(model: nn.Module) -> dict[str, int]:
    """How many projections and expert groups of `model` run in FP8 (for logs and tests)."""
    experts = [m for m in model.modules() if getattr(m, "grouped_mm", None) is fp8_grouped_mm]
    return {"linear": sum(isinstance(m, FP8Linear) for m in model.modules()), "experts": len(experts)}
