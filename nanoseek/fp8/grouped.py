"""FP8 grouped GEMM for the routed experts: `nanoseek.model.moe`'s grouped_mm in V3's recipe.

x [M, in] holds the token copies sorted by expert, `offsets` [E] the cumulative row counts, w [E, in, out]
every expert's weight. Each expert's rows go through the FP8 linear's three GEMMs (`fp8.linear`): tiles
of the activations are per row, so the whole x is quantised once; weights per 128 x 128 block of each
expert; Wgrad tiles run over that expert's tokens. On CPU this is a loop over the experts that received
rows (a fused grouped FP8 kernel is a GPU matter; see docs/fp8.md).
"""

from __future__ import annotations

import torch

from nanoseek.fp8.linear import dgrad, fprop, output_dtype, wgrad
from nanoseek.fp8.quantize import dequantize_tiles, quantize_blocks, quantize_tiles


def _groups(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert with rows."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]


class FP8GroupedMMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, out_dtype: torch.dtype):
        xq, xs = quantize_tiles(x)
        wq, ws = quantize_blocks(w.detach().transpose(1, 2))  # per expert [out, in], 128 x 128 blocks
        groups = _groups(offsets)
        y = x.new_zeros(x.shape[0], w.shape[2], dtype=torch.float32)
        for e, s, t in groups:
            y[s:t] = fprop(xq[s:t], xs[s:t], wq[e], ws[e])
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.groups, ctx.dtypes = groups, (x.dtype, w.dtype)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        dy = dy.float()
        dx = torch.zeros(xq.shape, dtype=torch.float32, device=dy.device) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(wq.shape, dtype=torch.float32, device=dy.device) if ctx.needs_input_grad[1] else None
        for e, s, t in ctx.groups:
            if dx is not None:
                dx[s:t] = dgrad(dy[s:t], wq[e], ws[e])
            if dw is not None:
                dw[e] = wgrad(dy[s:t], dequantize_tiles(xq[s:t], xs[s:t]))
        return (None if dx is None else dx.to(ctx.dtypes[0]),
                None if dw is None else dw.transpose(1, 2).to(ctx.dtypes[1]), None, None)


@torch.compiler.disable
def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, in] sorted by group, w [E, in, out], offsets [E] -> [M, out] (same contract as
    `nanoseek.model.moe._grouped_mm`)."""
    if w.dim() != 3 or x.dim() != 2 or x.shape[1] != w.shape[1] or offsets.shape != (w.shape[0],):
        raise ValueError(f"fp8_grouped_mm: rows {tuple(x.shape)}, weights {tuple(w.shape)} and offsets "
                         f"{tuple(offsets.shape)} do not fit ([M, in], [E, in, out], [E])")
    return FP8GroupedMMFunction.apply(x, w, offsets, output_dtype(x))
