"""Multi-head Latent Attention (DeepSeek-V2 paper, §2.1; DeepSeek-V3 technical report, §2.1.1).

Keys and values are rebuilt from one low-rank latent `c` (kv_lora_rank) plus a single RoPE key `k_pe`
shared by all heads. One module, two ways to compute the same attention, chosen by the `cache` argument:

- without a cache (training, scoring): the naive path. Expand `c` to per-head keys and values with
  `kv_b_proj`, then ordinary causal attention (SDPA).
- with a `LatentKVCache` (generation, prefill and decode alike): the absorbed path. Only `c` and `k_pe`
  are stored per token; `kv_b_proj` is folded into the query (W_UK) and the output (W_UV), so keys and
  values are never expanded per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.cache import LatentKVCache
from nanoseek.model.linear import linear
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx  # which layer of a LatentKVCache this attention reads and writes
        self.n_heads = cfg.num_attention_heads
        self.d_nope, self.d_rope, self.d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        q_out = self.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = linear(cfg.hidden_size, q_out)
        else:
            self.q_a_proj = linear(cfg.hidden_size, cfg.q_lora_rank, cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = linear(cfg.q_lora_rank, q_out)
        self.kv_a_proj_with_mqa = linear(cfg.hidden_size, cfg.kv_lora_rank + self.d_rope, cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = linear(cfg.kv_lora_rank, self.n_heads * (self.d_nope + self.d_v))
        self.o_proj = linear(self.n_heads * self.d_v, cfg.hidden_size, cfg.attention_bias)

    # -- pieces shared by the naive and the absorbed path -------------------------------------------
    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q_nope [B, H, T, d_n], q_pe [B, H, T, d_r] (rotated)."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, -1).transpose(1, 2)
        q_nope, q_pe = q.split([self.d_nope, self.d_rope], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, self.cfg.rope_interleave)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> normalised latent c [B, T, r_kv] and rotated shared key k_pe [B, T, d_r]:
        exactly what the decode cache stores."""
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.d_rope], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin, self.cfg.rope_interleave).squeeze(1)
        return self.kv_a_layernorm(c), k_pe

    def expand_latent(self, c: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c [B, S, r_kv], k_pe [B, S, d_r] -> per-head k [B, H, S, d_n + d_r], v [B, H, S, d_v]."""
        B, S, _ = c.shape
        kv = self.kv_b_proj(c).view(B, S, self.n_heads, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, self.n_heads, S, self.d_rope)], dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: LatentKVCache | None = None) -> torch.Tensor:
        """Causal self-attention over x [B, T, D].

        Without `cache`: attn_mask is an optional bool [B, 1, T, T] (True = attend) for padded or packed
        batches; without it the causal mask is implicit (faster SDPA path).
        With `cache`: the tokens go to the slots of `cache.step` and attend to everything valid before
        them (the step's mask; attn_mask must be None)."""
        if cache is not None:
            if attn_mask is not None:
                raise ValueError("with a cache the attention mask comes from the cache step")
            return self.absorbed(x, cos, sin, cache)
        return self.naive(x, cos, sin, attn_mask)

    def naive(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_pe = self.query(x, cos, sin)
        c, k_pe = self.latent(x, cos, sin)
        k, v = self.expand_latent(c, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                             scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.d_v))

    def absorbed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
        """Same math as `naive`, over the latent cache, in fewer and larger ops: generation is bound by
        per-op overhead. Cache rows are [c | k_pe]; this call writes the new tokens' rows, then attends
        with the step's additive mask [B, 1 or T, start + T] (a static step's: [B, 1 or T, max_len])."""
        B, T, _ = x.shape
        H, r, d_n = self.n_heads, self.kv_lora_rank, self.d_nope
        step, kv_all = cache.step, cache.layer(self.layer_idx)
        S = step.start + T
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, H, -1).transpose(1, 2).split([d_n, self.d_rope], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([r, self.d_rope], dim=-1)
        # Query and key RoPE in one call: the shared key rides along as head H.
        pe = apply_rope(torch.cat([q_pe, k_pe.unsqueeze(1)], dim=1), cos, sin, self.cfg.rope_interleave)
        new = torch.cat([self.kv_a_layernorm(c), pe[:, H]], dim=-1)
        if step.slots is None:
            kv_all[:, step.start:S] = new
            kv = kv_all[:, :S]
        else:  # static-shape step: write by slot index, attend over the whole cache (the mask spans it)
            kv_all.index_copy_(1, step.slots, new)
            kv = kv_all
        # kv_b_proj.weight viewed [H, d_n + d_v, r_kv]: W_UK = first d_n rows per head, W_UV = the rest.
        w_kv = self.kv_b_proj.weight.view(H, d_n + self.d_v, r)
        q_lat = torch.bmm(q_nope.transpose(0, 1).reshape(H, B * T, d_n), w_kv[:, :d_n])  # q~ = q_nope W_UK
        q = torch.cat([q_lat.view(H, B, T, r).transpose(0, 1), pe[:, :H]], dim=-1)  # [B, H, T, r + d_r]
        mask = step.mask if T == 1 else step.mask.repeat(1, H, 1)  # [B, T, S] -> [B, H * T, S], head-major
        scores = torch.baddbmm(mask, q.reshape(B, H * T, r + self.d_rope), kv.transpose(1, 2), alpha=self.scale)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
        o = torch.bmm(probs, kv[..., :r])  # attention over the latents: [B, H * T, r]
        o = torch.bmm(o.view(B, H, T, r).transpose(0, 1).reshape(H, B * T, r), w_kv[:, d_n:].transpose(1, 2))
        return self.o_proj(o.view(H, B, T, self.d_v).permute(1, 2, 0, 3).reshape(B, T, H * self.d_v))
