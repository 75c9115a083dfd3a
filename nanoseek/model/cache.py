"""The latent KV cache of Multi-head Latent Attention (DeepSeek-V2 paper, §2.1; docs/design.md).

Per token and layer MLA needs only the normalised latent `c` (kv_lora_rank) and the rotated shared RoPE
key `k_pe` (qk_rope_head_dim); the per-head keys and values are never materialised when a cache is used
(the absorbed path of `MLA.forward` folds `kv_b_proj` into the query and the output instead). We store the
two side by side in one row, `[c | k_pe]`, because the absorbed score is then a single dot product:
`q~ . c + q_pe . k_pe = [q~ | q_pe] . [c | k_pe]`.

Layout: slot-aligned. Every row of the batch writes its t-th step into the same slot, so a step is one
slice assignment for the whole batch. Rows differ only in which slots hold real tokens (`valid`):
left padding of ragged prompts, and speculative drafts that were rejected, are simply invalid slots
that attention masks out. Each row keeps its own position counter (`lengths` = tokens cached so far,
which is also the RoPE position of its next token), so positions stay contiguous per row whatever the
slot layout.

A forward pass with a cache first reserves slots for its tokens (`begin_step`); the resulting `CacheStep`
(first slot, positions, attention mask) is what every layer of that pass shares, and the MTP module's
pass over the same tokens reuses it (`cache.step`).

Static-shape steps (`begin_static_step`, for a compiled decode step): the step's slots are a tensor and
its mask spans the whole preallocated cache, so every decode step has the same shapes and one compiled
graph serves them all. Unreserved slots are masked like padding; the math is the same as a dynamic step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class CacheStep:
    """The slots one forward pass writes, shared by all its layers."""
    start: int  # first slot of the step
    positions: torch.Tensor  # [batch, n] RoPE positions of the step's tokens
    mask: torch.Tensor  # additive [batch, 1 or n, start + n]: 0 = attend, -inf = not
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), computed once per step
    # Static-shape step: long [n] slot indices of its tokens, and `mask` covers every slot of the cache
    # ([batch, 1 or n, max_len]), so attention reads the whole cache and the shapes never change.
    slots: torch.Tensor | None = None

    def rope_tables(self, rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the step's positions from `rotary`, computed on first use only."""
        if self.rope is None:
            self.rope = rotary(self.positions)
        return self.rope


class CacheView:
    """What one forward pass reads of a cache (`MLA.absorbed`): the reserved `step` and each layer's rows.
    A compiled decode step builds one from plain tensors, so the cache's bookkeeping stays outside it."""

    def __init__(self, kv_layers: list[torch.Tensor], step: CacheStep):
        self.kv_layers, self.step = kv_layers, step

    def layer(self, i: int) -> torch.Tensor:
        return self.kv_layers[i]


class LatentKVCache:
    """Preallocated cache, per layer [batch, max_len, kv_lora_rank + qk_rope_head_dim], plus validity.

    Each layer is its own tensor (not a view of one big one): a compiled step that writes a layer's slots
    in place then updates just that tensor, where views of a shared base would make it copy the whole
    cache every step. `layers` may exceed the model's depth: speculative decoding keeps the MTP block's
    latents in an extra layer that shares the same slots and mask.
    """

    def __init__(self, layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        self.kv_layers = [torch.zeros(batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)
                          for _ in range(layers)]
        # Additive attention bias per key slot: 0 for a real token, -inf for padding / rejected / unused.
        self.bias = torch.full((batch, max_len), NEG_INF, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = 0  # next free slot, shared by all rows
        self.step: CacheStep | None = None  # the step reserved last (see `begin_step`)

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, extra_layers: int = 0) -> "LatentKVCache":
        cfg = model.config
        weight = model.model.embed_tokens.weight
        return cls(cfg.num_hidden_layers + extra_layers, batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                   dtype=weight.dtype, device=weight.device)

    # ------------------------------------------------------------------ sizes
    @property
    def batch(self) -> int:
        return self.bias.shape[0]

    @property
    def max_len(self) -> int:
        return self.bias.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.bias.dtype

    @property
    def device(self) -> torch.device:
        return self.bias.device

    @property
    def valid(self) -> torch.Tensor:
        """[batch, max_len] bool: which slots hold a real token."""
        return self.bias == 0

    def nbytes(self) -> int:
        return sum(kv.numel() * kv.element_size() for kv in self.kv_layers)

    def bytes_per_token(self) -> float:
        """Measured storage per cached token (all layers): (kv_lora_rank + rope_dim) * layers * dtype bytes."""
        return self.nbytes() / (self.batch * self.max_len)

    def layer(self, i: int) -> torch.Tensor:
        """Layer i's [batch, max_len, kv_lora_rank + rope_dim] tensor; `MLA.forward` writes into it."""
        return self.kv_layers[i]

    # ------------------------------------------------------------------ bookkeeping
    def begin_step(self, n: int, valid: torch.Tensor | None = None) -> CacheStep:
        """Reserve the next `n` slots for a step; `valid` [batch, n] bool marks real tokens (None: all).

        Returns the step (first slot, position ids [batch, n], additive mask [batch, 1 or n, slots so far])
        and keeps it as `self.step`. The mask is shared by every layer of the step, so it is built once here.
        """
        start, end = self.slot, self.slot + n
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} slots needed, {self.max_len} allocated")
        self.slot = end
        if valid is None:
            positions = self.lengths[:, None] + torch.arange(n, device=self.lengths.device)
            self.bias[:, start:end] = 0.0
            self.lengths += n
        else:
            valid = valid.bool()
            positions = self.lengths[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)
            self.bias[:, start:end].masked_fill_(valid, 0.0)
            self.lengths += valid.sum(1)
        mask = self.bias[:, None, :end] if n == 1 else self._block_mask(start, end)
        self.step = CacheStep(start, positions, mask)
        return self.step

    def begin_static_step(self, n: int) -> CacheStep:
        """Like `begin_step` for `n` real tokens per row, as a static-shape step: slot indices as a tensor
        and a mask over all `max_len` slots (future slots are still -inf), so the shapes of every such
        step are the same and a compiled forward never sees a new one."""
        start, end = self.slot, self.slot + n
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} slots needed, {self.max_len} allocated")
        self.slot = end
        slots = torch.arange(start, end, device=self.device)
        positions = self.lengths[:, None] + slots - start
        self.bias[:, start:end] = 0.0
        self.lengths += n
        mask = self.bias[:, None, :] if n == 1 else self._block_mask(start, end, self.max_len)
        self.step = CacheStep(start, positions, mask, slots=slots)
        return self.step

    def _block_mask(self, start: int, end: int, width: int | None = None) -> torch.Tensor:
        """[batch, n, end] mask for a multi-token step: past valid slots, causal inside the new block,
        and every query may see its own slot so padded queries stay finite (their outputs are unused).
        `width` > end: the mask covers that many slots (static steps); the ones past `end` are unreserved."""
        n = end - start
        mask = self.bias[:, None, :width or end].repeat(1, n, 1)
        new = mask[:, :, start:end]
        new.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1), NEG_INF)
        new.diagonal(dim1=1, dim2=2).fill_(0.0)
        return mask

    def keep(self, rows: list[int]) -> None:
        """Drop every batch row not in `rows` (one copy of the cache; used when rows finish)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.kv_layers = [kv.index_select(0, index) for kv in self.kv_layers]
        self.bias = self.bias.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self.step = None  # per-row tensors of the last step no longer match the rows

    def invalidate(self, rows: torch.Tensor, slot: int) -> None:
        """Mark `slot` as holding no token for the rows where `rows` (bool [batch]) is True, and give
        those rows their position back. Speculative decoding calls it for rejected drafts."""
        self.bias[:, slot].masked_fill_(rows, NEG_INF)
        self.lengths -= rows.long()
