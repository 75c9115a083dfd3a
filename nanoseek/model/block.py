"""One pre-norm transformer block: MLA, then a dense FFN (first layers) or DeepSeekMoE.
Plain tensors in and out, so FSDP can wrap it and a pipeline stage can hold a run of them."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.cache import LatentKVCache
from nanoseek.model.ffn import FFN
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MoE
from nanoseek.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else FFN(cfg.hidden_size, cfg.intermediate_size)
        # Optional replacement of the forward without a cache, called as f(block, h, cos, sin, attn_mask) and
        # giving the same numbers: expert parallelism with overlap installs one that interleaves two halves of
        # the batch so one's all-to-all hides behind the other's computation (nanoseek.parallel.overlap).
        self.overlapped_forward = None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: LatentKVCache | None = None) -> torch.Tensor:
        """h [B, T, D] -> [B, T, D]. `attn_mask` / `cache`: see `MLA.forward`."""
        if self.overlapped_forward is not None and cache is None:
            return self.overlapped_forward(self, h, cos, sin, attn_mask)
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn_mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))
