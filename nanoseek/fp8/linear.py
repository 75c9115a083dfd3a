"""The FP8 linear layer: Fprop, Dgrad and Wgrad are all block-scaled FP8 GEMMs (DeepSeek-V3 technical
report §3.3, Figure 6), with fp32 master weights and fp32 weight gradients.

    Fprop  y  = x  @ W.T   x: 1 x 128 tiles along in_features     W: 128 x 128 blocks
    Dgrad  dx = dy @ W     dy: 1 x 128 tiles along out_features   W.T: the same blocks, transposed
    Wgrad  dW = dy.T @ x   dy.T and x.T: tiles of 128 *tokens* (V3's 128 x 1 tiles)

Saved for backward: the FP8 input with its tile scales and the FP8 weight with its block scales, not the
high-precision input (that is where FP8 training saves activation memory). Wgrad needs the input tiled
along tokens, so backward dequantises the saved 1 x 128 tiles, transposes and requantises them in
128 x 1 tiles: what V3 does (its §3.5.2 asks hardware to fuse exactly this).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.fp8.gemm import scaled_gemm
from nanoseek.fp8.quantize import block_scales_per_row, dequantize_tiles, quantize_blocks, quantize_tiles


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """What a high-precision linear would return: autocast's dtype inside autocast, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fprop(xq, xs, wq, ws) -> torch.Tensor:
    """x [M, K] (1 x 128 tiles) @ W [N, K] (128 x 128 blocks) .T -> fp32 [M, N]."""
    return scaled_gemm(xq, xs, wq, block_scales_per_row(ws, wq.shape[0]))


def dgrad(dy: torch.Tensor, wq, ws) -> torch.Tensor:
    """dy [M, N] @ W [N, K] -> fp32 [M, K]; dy quantised in 1 x 128 tiles along N."""
    dyq, dys = quantize_tiles(dy)
    return scaled_gemm(dyq, dys, wq.t(), block_scales_per_row(ws.t(), wq.shape[1]))


def wgrad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy [M, N].T @ x [M, K] -> fp32 [N, K]; both quantised in tiles of 128 tokens."""
    dyq, dys = quantize_tiles(dy.t())
    xq, xs = quantize_tiles(x.t())
    return scaled_gemm(dyq, dys, xq, xs)


class FP8LinearFunction(torch.autograd.Function):
    """y = x @ W.T for x [M, K] (any float dtype) and fp32 W [N, K], in FP8 both ways."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        xq, xs = quantize_tiles(x)
        wq, ws = quantize_blocks(weight.detach())
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.dtypes = (x.dtype, weight.dtype)
        return fprop(xq, xs, wq, ws).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        dy = dy.float()
        dx = dgrad(dy, wq, ws).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dw = wgrad(dy, dequantize_tiles(xq, xs)).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dx, dw, None


@torch.compiler.disable  # FP8 tensors and _scaled_mm run eagerly; torch.compile graph-breaks around them
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in V3's FP8 recipe: x [..., K], weight [N, K] -> [..., N]. The bias (nanoseek's
    projections have none unless attention_bias) is added in high precision."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: input [..., {x.shape[-1]}] does not fit weight {tuple(weight.shape)}")
    dtype = output_dtype(x)
    y = FP8LinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, dtype).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(dtype)


class FP8Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict, fp32 master weight) whose matmuls run in FP8."""

    # Disabled as a whole, not only inside: dynamo would otherwise trace this frame up to the graph break
    # and recompile it for every weight shape, hitting its recompile limit on any real model.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)


def fp8_linear_factory(in_features: int, out_features: int, bias: bool) -> nn.Module:
    """For `nanoseek.model.linear.set_linear_factory`."""
    return FP8Linear(in_features, out_features, bias=bias)
