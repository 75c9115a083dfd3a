"""FLOPs counted on a real model by torch's FlopCounterMode, to check the formulas of
`nanoseek.cost.accounting` against (tests/test_cost.py)."""

from __future__ import annotations

import math
from typing import Any


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """`torch._grouped_mm` (MoE experts) is not in torch's FLOP registry, so it would count 0.
    2D x 2D groups split the shared K dimension (out is [G, M, N]); every other layout contracts all
    of A's last dimension into each output element."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU flash-attention kernel is not registered either. Like torch's own SDPA formulas this
    counts the full T x T products whether or not the call is causal."""
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def measured_forward_flops(model: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs torch's FlopCounterMode counts for one forward call `model(*args, **kwargs)`.
    It counts matmul-type ops only (mm, addmm, bmm, baddbmm, SDPA kernels) plus the two ops we register:
    `_grouped_mm` and the CPU flash SDPA kernel. SDPA is counted over the full T x T even when causal."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._grouped_mm: grouped_mm_flops}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa_flops
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops()
