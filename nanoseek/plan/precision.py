"""Training precision recipes: bytes per parameter of each piece of training state, bytes per kept
activation, bytes on the wire for expert dispatch/combine, and which peak the GEMMs run at."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from nanoseek.errors import require


@dataclass(frozen=True)
class Precision:
    name: str
    gemm_peak: str          # hardware-table peak the eligible GEMMs run at ("fp8", "bf16", "fp32")
    high_peak: str          # peak of the parts kept in high precision (attention core, router, head)
    weight_bytes: float     # working copy the forward/backward reads
    master_bytes: float     # optimizer's master copy (0: the working copy is the master)
    grad_bytes: float       # gradient accumulation buffer
    moment_bytes: float     # each of AdamW's two moments
    act_bytes: float        # a kept activation
    linear_in_bytes: float  # a kept input of a linear layer (read again by the weight gradient)
    dispatch_bytes: float   # per element sent to the experts
    combine_bytes: float    # per element sent back from the experts (and both backward exchanges)
    source: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPES = {
    "fp32": Precision(
        "fp32", "fp32", "fp32", 4, 0, 4, 4, 4, 4, 4, 4,
        "plain fp32 (nanoseek on CPU): weights, gradients, AdamW moments and activations all 4 bytes"),
    "bf16": Precision(
        "bf16", "bf16", "bf16", 2, 4, 4, 4, 2, 2, 2, 2,
        "mixed precision: bf16 weights and activations, fp32 master weights, gradients and AdamW moments"),
    "fp8": Precision(
        "fp8", "fp8", "bf16", 2, 4, 4, 2, 2, 1, 1, 2,
        "DeepSeek-V3 technical report §3.3: linear-layer GEMMs in FP8 (embedding, output head, router, "
        "norms and attention core stay BF16/FP32), FP32 master weights and gradients, BF16 AdamW moments, "
        "linear-layer inputs cached in FP8 for the backward, dispatch in FP8 and combine in BF16; the "
        "working weight copy is counted as BF16 (its FP8 casts are transient)"),
}


def precision(name: str) -> Precision:
    require(name in RECIPES, "--precision", name, "one of " + ", ".join(RECIPES))
    return RECIPES[name]
