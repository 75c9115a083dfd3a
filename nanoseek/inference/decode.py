"""The model's forward pass over new tokens with the latent KV cache (prefill and decode alike).

Same modules and weights as `DeepseekV3ForCausalLM.forward`; what differs is the attention (the
absorbed `MLA.decode`, which reads and writes the cache) and how the pieces are called: decoding a few
tokens is bound by per-op overhead, not FLOPs, so everything shared by the layers of a step (RoPE
tables, attention mask) is built once per step, norms are single fused ops, and on CPU routed experts run
as one matmul pair per expert that received tokens (CPU `grouped_mm` loops over every expert, empty or
not, which costs more than the experts themselves at decode sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.inference.cache import LatentKVCache
from nanoseek.model.mla import _rms_norm
from nanoseek.model.moe import MoE


@dataclass
class Step:
    """What every layer of one forward step shares: the first cache slot, RoPE tables and the mask."""
    start: int
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor


def begin_step(model, cache: LatentKVCache, n: int, valid: torch.Tensor | None = None) -> Step:
    """Reserve `n` cache slots for the next tokens (`valid` [B, n] marks real ones; None = all)."""
    start, positions, mask = cache.append(valid, n)
    cos, sin = model.model.rotary_emb(positions)
    return Step(start, cos, sin, mask)


def _expert(moe: MoE, x: torch.Tensor, e: int) -> torch.Tensor:
    """Routed expert e on rows x [n, D]: down(silu(gate(x)) * up(x))."""
    gate, up = F.linear(x, moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, moe.experts.down_proj[e])


def routed_experts(moe: MoE, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_k w_k E_{idx_k}(x) for x [N, D], computing only the experts that received tokens."""
    N, K = idx.shape
    if N == 1:  # one token (batch-1 decoding): no sorting, just its K experts
        return sum(w * _expert(moe, x, e) for e, w in zip(idx[0].tolist(), weights[0].tolist()))
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    rows = x[order // K]
    outs, first = [], 0
    for e, count in enumerate(torch.bincount(flat, minlength=moe.experts.down_proj.shape[0]).tolist()):
        if count:
            outs.append(_expert(moe, rows[first:first + count], e))
            first += count
    out = torch.empty_like(rows).index_copy_(0, order, torch.cat(outs)).view(N, K, -1)
    return torch.bmm(weights.to(x.dtype).unsqueeze(1), out).squeeze(1)


def moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Inference forward of a DeepSeekMoE layer (router and shared experts are the module's own).
    On accelerators the module's grouped GEMM is one kernel and needs no host sync, unlike the
    per-expert loop, so it is used there."""
    if x.device.type != "cpu":
        return moe(x)
    B, T, D = x.shape
    flat = x.reshape(-1, D)
    weights, idx, _ = moe.gate(flat)
    out = routed_experts(moe, flat, weights, idx)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(flat)
    return out.view(B, T, D)


def block_cached(block, h: torch.Tensor, step: Step, kv: torch.Tensor) -> torch.Tensor:
    """One transformer block over new tokens h [B, T, D], attending to the latent cache layer `kv`."""
    h = h + block.self_attn.decode(_rms_norm(block.input_layernorm, h), step.cos, step.sin, kv, step.start,
                                   step.mask)
    x = _rms_norm(block.post_attention_layernorm, h)
    return h + (moe_forward(block.mlp, x) if isinstance(block.mlp, MoE) else block.mlp(x))


def trunk_cached(model, input_ids: torch.Tensor, step: Step, cache: LatentKVCache) -> torch.Tensor:
    """Embedding -> all blocks -> final norm for the step's tokens; returns normed hidden [B, T, D]."""
    h = model.model.embed_tokens(input_ids)
    for i, layer in enumerate(model.model.layers):
        h = block_cached(layer, h, step, cache.layer(i))
    return _rms_norm(model.model.norm, h)


def forward_cached(model, input_ids: torch.Tensor, cache: LatentKVCache,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Run `input_ids` [B, T] through the trunk, appending to `cache`; returns the final normed hidden
    states [B, T, D] (what the output head and the MTP module read). `valid` [B, T] marks real tokens."""
    return trunk_cached(model, input_ids, begin_step(model, cache, input_ids.shape[1], valid), cache)
