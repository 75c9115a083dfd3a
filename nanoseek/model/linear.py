"""The one place projections are built.

Every dense projection in the model is created by `linear(...)`, so an FP8 (or other quantised) linear can
replace all of them by swapping the factory with `set_linear_factory` before the model is built.
The routed experts' grouped GEMM is swapped the same way (`set_grouped_gemm`; nanoseek.fp8 installs both).
Kept in high precision on purpose and therefore NOT built here (V3 keeps them so): the embedding,
the output head, the router gate and the norms.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

LinearFactory = Callable[[int, int, bool], nn.Module]
# x [M, in] rows sorted by expert, w [E, in, out], offsets [E] cumulative row counts -> [M, out]
GroupedGemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _default_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


_factory: LinearFactory = _default_linear
_grouped_gemm: GroupedGemm | None = None


def linear(in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    return _factory(in_features, out_features, bias)


def linear_factory() -> LinearFactory | None:
    """The installed factory (None: nn.Linear)."""
    return None if _factory is _default_linear else _factory


def set_linear_factory(factory: LinearFactory | None) -> None:
    """Install a factory (None restores nn.Linear). Affects models built afterwards."""
    global _factory
    _factory = factory or _default_linear


def grouped_gemm() -> GroupedGemm | None:
    """The routed experts' GEMM for models built now (None: moe's own grouped_mm)."""
    return _grouped_gemm


def set_grouped_gemm(gemm: GroupedGemm | None) -> None:
    """Install the routed experts' GEMM (None restores the default). Affects models built afterwards."""
    global _grouped_gemm
    _grouped_gemm = gemm
