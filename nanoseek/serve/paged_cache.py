"""The latent KV cache in fixed-size blocks, for a server whose batch changes every step.

`nanoseek.model.cache.LatentKVCache` is slot-aligned: one [batch, max_len] tensor per layer, every row
writing its t-th step into slot t. That suits a fixed batch, but a server's rows join and leave between
steps and live for very different lengths. Here the latents of all sequences live in one pool of
`block_size`-token blocks; a sequence holds a list of blocks (its block table) that grows one block at a
time as it decodes and goes back to the free list the moment the sequence finishes or is cancelled. The
cache a sequence holds follows its live tokens, not the longest request the server could take.

The model's attention (`MLA.absorbed`) reads one contiguous [B, slots, width] tensor per layer and writes
its new tokens at `cache.step.start`. `BatchView` gives it exactly that for one forward pass over any set
of sequences: per layer it gathers the sequences' blocks into a left-padded tensor (the `LatentKVCache`
layout of a ragged batch: sequence b's tokens end at slot `start - 1`, the slots before it are masked
out), lets the model write the new tokens behind them, and copies those back into the sequences' blocks.
The gathered tensor is transient: one layer at a time, freed after the step. The view changes nothing
until `commit()`, so a forward pass that fails leaves every sequence as it was.

Position ids are per sequence (its cached length), so a sequence's RoPE positions and its attention
are the same whatever else shares the batch; only floating-point summation order can differ
(docs/serving.md, "Determinism").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanoseek.model.cache import NEG_INF, CacheStep


class CacheFull(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class BlockPool:
    """Storage for all sequences, handed out by blocks: [layers, blocks * block_size, width].

    The storage grows with demand: it starts with `initial_blocks` and, when a request for blocks finds
    too few free, doubles (at least to what is needed) up to `num_blocks`, copying what it holds. So the
    memory of the pool follows the peak of live tokens, up to the configured maximum; it is not given
    back (the next peak reuses it). Block 0 is never handed out: it is all zeros and is what padding
    slots gather."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, width: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", initial_blocks: int = 64):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a block pool needs >= 2 blocks of >= 1 token, got {num_blocks} x {block_size}")
        self.block_size, self.num_blocks = block_size, num_blocks
        size = max(2, min(initial_blocks, num_blocks))
        self.kv = torch.zeros(layers, size * block_size, width, dtype=dtype, device=device)
        self._free = list(range(size - 1, 0, -1))  # a stack: the most recently freed block is reused first

    @classmethod
    def for_model(cls, model, tokens: int, block_size: int = 16, extra_layers: int = 0,
                  initial_tokens: int = 1024) -> "BlockPool":
        """A pool for up to `tokens` tokens (rounded up to whole blocks) of `model`'s layers (+ `extra_layers`,
        the MTP block's for speculative decoding), starting with room for `initial_tokens`."""
        cfg = model.config
        weight = model.model.embed_tokens.weight
        return cls(cfg.num_hidden_layers + extra_layers, 1 + -(-tokens // block_size), block_size,
                   cfg.kv_lora_rank + cfg.qk_rope_head_dim, weight.dtype, weight.device,
                   initial_blocks=1 + -(-initial_tokens // block_size))

    @property
    def allocated_blocks(self) -> int:
        """Blocks the storage holds now (block 0 included)."""
        return self.kv.shape[1] // self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks that can still be handed out: free ones plus those the storage may still grow by."""
        return len(self._free) + self.num_blocks - self.allocated_blocks

    @property
    def capacity_blocks(self) -> int:
        return self.num_blocks - 1

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.free_blocks:
            raise CacheFull(f"{n} cache blocks needed, {self.free_blocks} free")
        if n > len(self._free):
            self._grow(self.allocated_blocks + n - len(self._free))
        return [self._free.pop() for _ in range(n)]

    def _grow(self, needed: int) -> None:
        old = self.allocated_blocks
        new = min(self.num_blocks, max(needed, 2 * old))
        kv = self.kv.new_zeros(self.kv.shape[0], new * self.block_size, self.kv.shape[2])
        kv[:, :old * self.block_size] = self.kv
        self.kv = kv
        self._free[:0] = range(new - 1, old - 1, -1)  # below the stack: freed blocks are still reused first

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def nbytes(self) -> int:
        """Bytes the storage holds now."""
        return self.kv.numel() * self.kv.element_size()

    def max_nbytes(self) -> int:
        return self.nbytes() // self.allocated_blocks * self.num_blocks


@dataclass
class SequenceBlocks:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens cached (= the RoPE position of the next one)


class PagedLatentCache:
    """Sequences (by id) and their block tables over one `BlockPool`."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.seqs: dict[int, SequenceBlocks] = {}

    def add(self, sid: int) -> None:
        if sid in self.seqs:
            raise ValueError(f"sequence {sid} is already cached")
        self.seqs[sid] = SequenceBlocks()

    def release(self, sid: int) -> None:
        """Forget a sequence and return its blocks to the pool (no-op for an unknown id)."""
        seq = self.seqs.pop(sid, None)
        if seq is not None:
            self.pool.release(seq.blocks)

    def length(self, sid: int) -> int:
        return self.seqs[sid].length

    def blocks_held(self) -> int:
        return sum(len(s.blocks) for s in self.seqs.values())

    def reserve(self, sid: int, tokens: int) -> None:
        """Make sequence `sid` hold blocks for at least `tokens` tokens (CacheFull if the pool cannot)."""
        seq = self.seqs[sid]
        missing = self.pool.blocks_for(tokens) - len(seq.blocks)
        if missing > 0:
            seq.blocks += self.pool.allocate(missing)

    def view(self, sids: list[int]) -> "BatchView":
        return BatchView(self, sids)


class BatchView:
    """One forward pass (and the MTP pass over the same tokens) over the sequences `sids`, in the
    interface `MLA.absorbed` and the speculative steps use: `begin_step`, `step`, `layer(i)`,
    `invalidate`, `kv` (for its device). `commit()` makes the step's tokens part of the sequences."""

    def __init__(self, cache: PagedLatentCache, sids: list[int]):
        self.cache, self.pool, self.sids = cache, cache.pool, list(sids)
        self.lengths = [cache.seqs[s].length for s in self.sids]  # after the step, once begun
        self.step: CacheStep | None = None
        self._open: tuple[int, torch.Tensor] | None = None  # the layer whose gathered tensor is out

    @property
    def batch(self) -> int:
        return len(self.sids)

    @property
    def kv(self) -> torch.Tensor:
        return self.pool.kv  # the pool's storage now (it may have grown since the view was made)

    def begin_step(self, n: int, valid: torch.Tensor | None = None) -> CacheStep:
        """Slots for `n` new tokens per sequence (`valid` [B, n] marks real ones: left padding of a
        ragged prefill). Like `LatentKVCache.begin_step`, returns the step the layers share."""
        if self.step is not None:
            raise RuntimeError("a BatchView serves one step; make a new view for the next")
        B, device, bs = self.batch, self.kv.device, self.pool.block_size
        valid_cpu = torch.ones(B, n, dtype=torch.bool) if valid is None else valid.bool().cpu()
        tables = [self.cache.seqs[s].blocks for s in self.sids]
        width = max(1, max(len(t) for t in tables))
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)  # [B, blocks]
        before = torch.tensor(self.lengths, dtype=torch.long)
        after = before + valid_cpu.sum(1)
        held = torch.tensor([len(t) for t in tables], dtype=torch.long)
        if (held * bs < after).any():
            b = int((held * bs < after).nonzero()[0])
            raise CacheFull(f"sequence {self.sids[b]} holds too few blocks for {int(after[b])} tokens (reserve first)")
        start = int(before.max())

        def rows_of(pos: torch.Tensor) -> torch.Tensor:  # token positions [B, k] -> pool rows
            pos = pos.clamp(0, width * bs - 1)
            return table.gather(1, pos // bs) * bs + pos % bs

        past = torch.arange(start)[None, :] - (start - before[:, None])  # token index of each past slot
        real = past >= 0
        gather = torch.where(real, rows_of(past), 0)  # padding gathers block 0 (zeros)
        new_pos = before[:, None] + (valid_cpu.long().cumsum(1) - 1).clamp(min=0)  # [B, n]
        bias = torch.cat([torch.where(real, 0.0, NEG_INF), torch.where(valid_cpu, 0.0, NEG_INF)], dim=1)
        src_b, src_j = valid_cpu.nonzero(as_tuple=True)
        self._gather = gather.flatten().to(device)
        self._dst = rows_of(new_pos)[valid_cpu].to(device)
        self._src = (src_b.to(device), (start + src_j).to(device))
        self._start, self._n = start, n
        self.lengths = after.tolist()
        bias = bias.to(device=device, dtype=self.kv.dtype)
        if n == 1:
            mask = bias[:, None, :]
        else:  # past valid slots, causal inside the new block, every query sees its own slot
            mask = bias[:, None, :].repeat(1, n, 1)
            new = mask[:, :, start:]
            new.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), NEG_INF)
            new.diagonal(dim1=1, dim2=2).fill_(0.0)
        self.step = CacheStep(start, new_pos.to(device), mask)
        return self.step

    def layer(self, i: int) -> torch.Tensor:
        """[B, start + n, width] for layer i: the sequences' cached latents (gathered, left-padded) and
        room for the step's tokens, which the attention writes and `commit` (or the next layer) copies back."""
        if self._open is not None:
            if self._open[0] == i:
                return self._open[1]
            self._write_back()
        B, W = self.batch, self.kv.shape[-1]
        dense = torch.empty(B, self._start + self._n, W, dtype=self.kv.dtype, device=self.kv.device)
        dense[:, :self._start] = self.kv[i].index_select(0, self._gather).view(B, self._start, W)
        self._open = (i, dense)
        return dense

    def _write_back(self) -> None:
        i, dense = self._open
        self.kv[i].index_copy_(0, self._dst, dense[self._src])
        self._open = None

    def invalidate(self, rows: torch.Tensor, slot: int) -> None:
        """Speculative decoding rejected the token in `slot` for the rows where `rows` is True. Only the
        step's last slot can be rejected, so the sequence simply ends one token earlier."""
        if slot != self._start + self._n - 1:
            raise ValueError("only the last slot of a step can be invalidated")
        for b in rows.nonzero().flatten().tolist():
            self.lengths[b] -= 1

    def commit(self) -> None:
        """Copy the last layer's new tokens into the blocks and record the sequences' new lengths."""
        if self._open is not None:
            self._write_back()
        for sid, length in zip(self.sids, self.lengths):
            self.cache.seqs[sid].length = length
