"""Fine-grained FP8 quantisation, DeepSeek-V3's recipe (technical report §3.3.2; docs/fp8.md).

E4M3 everywhere (forward and backward). Scales are computed online from the current max-abs, one per
  activation tile   1 x 128: one token, 128 consecutive channels of the contracted dimension;
  weight block    128 x 128: 128 output x 128 input channels.
A scale is the *dequantisation* multiplier, `amax / 448` (448 = E4M3's largest finite value), so the
stored value is x / scale and x ~= fp8 * scale. That is DeepSeek's `weight_scale_inv`. The last tile or
block of a dimension that is not a multiple of 128 is partial: its scale covers the columns it has.
"""

from __future__ import annotations

import torch

TILE = 128  # elements per scale along the contracted dimension (V3's N_C), and the weight block edge
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_TINY = 1e-12  # an all-zero tile gets this amax: its scale is tiny, its FP8 values are 0


def n_tiles(size: int, tile: int = TILE) -> int:
    return -(-size // tile)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = n_tiles(x.shape[-1], multiple) * multiple - x.shape[-1]
    return torch.nn.functional.pad(x, (0, extra)) if extra else x


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The clamp only catches rounding of x / (amax / 448) a hair above 448: E4M3 has no infinity.
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_tiles(x: torch.Tensor, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 1 x `tile` quantisation along the last dimension: x [..., K] -> (fp8 [..., K],
    float32 scales [..., ceil(K / tile)])."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"quantize_tiles: cannot tile a tensor of shape {tuple(x.shape)} along its last dimension")
    K = x.shape[-1]
    padded = _pad_last(x.float(), tile)
    tiles = padded.unflatten(-1, (-1, tile))  # [..., nK, tile]
    scale = tiles.abs().amax(-1).clamp_min(_TINY) / FP8_MAX  # [..., nK]
    q = _to_fp8(tiles, scale.unsqueeze(-1)).flatten(-2)[..., :K].contiguous()
    return q, scale


def quantize_blocks(w: torch.Tensor, block: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per `block` x `block` quantisation of the last two dimensions: w [..., N, K] -> (fp8 [..., N, K],
    float32 scales [..., ceil(N / block), ceil(K / block)])."""
    if w.dim() < 2 or w.shape[-1] == 0 or w.shape[-2] == 0:
        raise ValueError(f"quantize_blocks: a weight must be [..., N, K] with N, K > 0, got {tuple(w.shape)}")
    N, K = w.shape[-2:]
    padded = _pad_last(_pad_last(w.float(), block).transpose(-1, -2), block).transpose(-1, -2)
    nN, nK = padded.shape[-2] // block, padded.shape[-1] // block
    blocks = padded.unflatten(-1, (nK, block)).unflatten(-3, (nN, block))  # [..., nN, b, nK, b]
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(_TINY) / FP8_MAX  # [..., nN, nK]
    q = _to_fp8(blocks, scale[..., :, None, :, None]).flatten(-4, -3).flatten(-2)[..., :N, :K].contiguous()
    return q, scale


def block_scales_per_row(scale: torch.Tensor, rows: int, block: int = TILE) -> torch.Tensor:
    """Block scales [..., nN, nK] -> the same scales per row [..., rows, nK] (each block's scale repeated
    over its rows): a 128 x 128 block-scaled operand is then a row-and-slice-scaled one."""
    return scale.repeat_interleave(block, dim=-2)[..., :rows, :]


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, tile: int = TILE,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_tiles`: fp8 [..., K] * its per-tile scales -> `dtype`."""
    K = q.shape[-1]
    return (q.to(torch.float32) * scale.repeat_interleave(tile, dim=-1)[..., :K]).to(dtype)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = TILE,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_blocks`: fp8 [..., N, K] * its per-block scales -> `dtype`."""
    return dequantize_tiles(q, block_scales_per_row(scale, q.shape[-2], block), block, dtype)
