"""Rotary position embedding: plain RoPE and YaRN (Peng et al., 2023, "YaRN: Efficient Context Window
Extension"; DeepSeek-V3 technical report, §4.3), interleaved or half-split layout.

DeepSeek checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...; we rotate those pairs and write the
result de-interleaved ([rotated evens | rotated odds]) exactly as transformers does. q and k get the same
permutation, so attention scores are unchanged and our logits match transformers bit for bit in layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.config import ModelConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    # The dimension whose wavelength completes `rotations` turns over the original context.
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d_r/2] and the cos/sin magnitude scale ("attention factor")."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if cfg.rope_type != "yarn":
        return inv_freq, 1.0
    rs = cfg.rope_scaling
    factor = rs["factor"]
    original = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    low, high = _correction_dim(beta_fast, dim, base, original), _correction_dim(beta_slow, dim, base, original)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / (high - low)).clamp(0, 1)
    # ramp = 0: high-frequency dims keep their frequency (extrapolate); ramp = 1: divided by factor.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape [..., T, d_r/2] for given positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x [B, heads, T, d_r] with cos/sin [B or 1, T, d_r/2]."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
