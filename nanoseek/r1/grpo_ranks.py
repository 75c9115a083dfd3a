"""What GRPO does differently on several data-parallel ranks (torchrun; docs/distributed.md).

Each rank rolls out its own share of the prompts (`prompts_per_step / ranks` groups: a group never
straddles ranks, so advantages stay within one rank), with sampling seeds of its own. What must be
global is reduced here: the loss normalisers (counted sequences and tokens of the whole batch, see
`grpo_loss.token_weights`), the rollout statistics, and whether the time limit is spent. With no
runtime (a plain one-process run) every method is the identity, so the recipe has one code path.

Sampling and evaluation run on `RolloutPolicy`, a full local copy of the policy refreshed from the
training model's shards: generation stops at a different step on every rank, which the sharded model
cannot do (each of its forwards is a collective that all ranks must join).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nanoseek.parallel.runtime import ParallelRuntime


class DataParallelRanks:
    """This rank's place among the data-parallel ranks, and the few reductions GRPO needs."""

    def __init__(self, parallel: ParallelRuntime | None = None):
        """`parallel`: the run's runtime; None outside a training run (a loss computed on its own: one rank)."""
        self.parallel = parallel
        self.rank = parallel.dp_rank if parallel else 0
        self.size = parallel.dp_size if parallel else 1
        self.group = parallel.ctx.dp_mesh.get_group() if parallel else None

    @property
    def lockstep(self) -> bool:
        """Whether the training model is sharded: then every rank must run the same forwards."""
        return self.parallel is not None and self.parallel.shards_model

    def sum(self, values: list[float]) -> list[float]:
        if not self.parallel:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.parallel.device)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def max(self, value: float) -> float:
        if not self.parallel:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.parallel.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        return self.max(1.0 if flag else 0.0) > 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (small picklable values: statistics, recipe state)."""
        if not self.parallel:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


class RolloutPolicy:
    """The model that samples rollouts and runs the greedy evaluation. One process: the training model
    itself. Several: a local unsharded copy (built before the training model was sharded), whose
    weights `refresh` gathers from the shards; every rank calls it at the same points."""

    def __init__(self, trained: nn.Module, copy: nn.Module | None = None):
        self.trained = trained
        self.copy = copy

    @property
    def model(self) -> nn.Module:
        return self.copy if self.copy is not None else self.trained

    @torch.no_grad()
    def refresh(self) -> None:
        if self.copy is None:
            return
        state = self.trained.state_dict()  # the same order on every rank: the gathers line up
        self.copy.load_state_dict({k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()})
