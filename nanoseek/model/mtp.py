"""Multi-token prediction (DeepSeek-V3 technical report, §2.2).

Module k combines the previous depth's hidden state at position i with the embedding of token i+k:
  h'_k = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_{k-1,i})]),  h_k = Block(h'_k),
and predicts token i+k+1 through the shared output head. Embedding and head are the main model's.
For k = 1, h_0 is the main trunk's final (normed) hidden state, the one the output head reads.
The block is layer `num_hidden_layers + k - 1` of the model, which is also the layer of a
`LatentKVCache` it uses when speculative decoding drafts with it.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
from nanoseek.model.cache import LatentKVCache
from nanoseek.model.linear import linear
from nanoseek.model.norm import RMSNorm


class SharedHeadNorm(nn.Module):
    """Holds `shared_head.norm` (checkpoint name); the head weight itself is the main model's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.depth = depth
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.block = Block(cfg, cfg.num_hidden_layers + depth - 1)
        self.shared_head = SharedHeadNorm(cfg)

    def forward(self, prev_hidden: torch.Tensor, next_embeds: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: LatentKVCache | None = None) -> torch.Tensor:
        """prev_hidden, next_embeds [B, T, D] aligned by position -> this depth's hidden [B, T, D].
        `attn_mask` / `cache`: see `MLA.forward`."""
        h = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(prev_hidden)], dim=-1))
        return self.block(h, cos, sin, attn_mask, cache)
