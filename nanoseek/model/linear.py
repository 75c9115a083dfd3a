"""The one place projections are built.

Every dense projection in the model is created by `linear(...)`, so an FP8 (or other quantised) linear can
replace all of them by swapping the factory with `set_linear_factory` before the model is built.
Kept in high precision on purpose and therefore NOT built here (V3 keeps them so): the embedding,
the output head, the router gate and the norms.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

LinearFactory = Callable[[int, int, bool], nn.Module]


def _default_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


_factory: LinearFactory = _default_linear


def linear(in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    return _factory(in_features, out_features, bias)


def set_linear_factory(factory: LinearFactory | None) -> None:
    """Install a factory (None restores nn.Linear). Affects models built afterwards."""
    global _factory
    _factory = factory or _default_linear
