"""Block-scaled FP8 GEMM with V3's promotion to FP32 every 128 elements of K.

Both operands come as FP8 [rows, K] with one float32 scale per row and per 128-wide slice of K
([rows, ceil(K / 128)]). A 1 x 128 activation tile is exactly that; a 128 x 128 weight block becomes it
by repeating the block's scale over its rows (`quantize.block_scales_per_row`). The product is

    out = sum over slices k of  (a[:, k] @ b[:, k].T) * a_scale[:, k] * b_scale[:, k].T

Each term is one `torch._scaled_mm` of FP8 operands with per-row scales (its "RowWise" mode), returned
in FP32 and added to an FP32 accumulator: the scales can only be applied once per slice, and adding the
slices in FP32 is what V3 does to escape the tensor cores' limited accumulation precision (technical
report §3.3.2, "increasing accumulation precision", N_C = 128). On CPU `_scaled_mm` accumulates inside a
slice in FP32 as well, so the CPU path is the recipe's arithmetic with a more precise inner sum.

On CUDA the same loop runs with the operands padded with zeros to multiples of 16 (cuBLASLt's FP8
alignment); zeros change no sum. It needs a GPU with FP8 tensor cores (sm_89 / sm_90 and newer); it has
not been run here (no GPU was lent to this work, see docs/fp8.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.fp8.quantize import TILE, n_tiles

_CUDA_ALIGN = 16


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0])) if (rows, cols) != tuple(x.shape) else x


def _slice_mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """One K slice: fp8 a [M, k] (scales [M, 1]) times fp8 b [N, k] (scales [N, 1]) transposed -> fp32."""
    M, N = a.shape[0], b.shape[0]
    if a.device.type == "cuda":  # cuBLASLt wants every FP8 dimension a multiple of 16
        up = lambda n: -(-n // _CUDA_ALIGN) * _CUDA_ALIGN  # noqa: E731
        k = up(a.shape[1])
        a, b = _pad_to(a, up(M), k), _pad_to(b, up(N), k)
        sa, sb = _pad_to(sa, up(M), 1), _pad_to(sb, up(N), 1)
    out = torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=sa.contiguous(),
                           scale_b=sb.reshape(1, -1).contiguous(), out_dtype=torch.float32)
    return out[:M, :N]


def scaled_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                tile: int = TILE) -> torch.Tensor:
    """a @ b.T in FP32 for FP8 a [M, K], b [N, K] with per-row, per-`tile`-slice scales a_scale [M, nK],
    b_scale [N, nK]."""
    M, K = a.shape
    N = b.shape[0]
    nK = n_tiles(K, tile)
    if b.shape[1] != K or tuple(a_scale.shape) != (M, nK) or tuple(b_scale.shape) != (N, nK):
        raise ValueError(f"scaled_gemm: operands [{M}, {K}] x [{N}, {b.shape[1]}] with scales "
                         f"{tuple(a_scale.shape)}, {tuple(b_scale.shape)}; expected [{M}, {nK}] and [{N}, {nK}]")
    out = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    if M == 0 or N == 0:
        return out
    for k in range(nK):
        cols = slice(k * tile, min(K, (k + 1) * tile))
        out += _slice_mm(a[:, cols], a_scale[:, k:k + 1], b[:, cols], b_scale[:, k:k + 1])
    return out


def reference_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   tile: int = TILE) -> torch.Tensor:
    """The same quantised math in float64 (dequantise each slice, multiply, accumulate): what tests and
    the error study compare `scaled_gemm` with."""
    K = a.shape[1]
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for k in range(n_tiles(K, tile)):
        cols = slice(k * tile, min(K, (k + 1) * tile))
        out += ((a[:, cols].double() * a_scale[:, k:k + 1].double())
                @ (b[:, cols].double() * b_scale[:, k:k + 1].double()).t())
    return out
