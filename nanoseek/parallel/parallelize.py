"""One call that lays a model out on the mesh: experts over EP, then FSDP2 over the data-parallel ranks."""

from __future__ import annotations

from torch import nn

from nanoseek.parallel.expert_parallel import apply_expert_parallel, sync_expert_grads
from nanoseek.parallel.fsdp import apply_fsdp, clip_grad_norm
from nanoseek.parallel.mesh import ParallelContext
from nanoseek.parallel.overlap import install_overlap
from nanoseek.parallel.traffic import TrafficMeter


def parallelize(model: nn.Module, ctx: ParallelContext, meter: TrafficMeter | None = None) -> nn.Module:
    """Shard `model` in place (every rank must have built it identically, e.g. from the same seed).
    `meter` collects the EP all-to-all traffic."""
    experts = apply_expert_parallel(model, ctx, meter) if ctx.cfg.ep > 1 else set()
    if ctx.cfg.overlap:
        install_overlap(model, ctx.cfg.ep)
    apply_fsdp(model, ctx, experts)
    return model


def finish_gradients(model: nn.Module, ctx: ParallelContext, max_norm: float) -> float:
    """After the last backward of a step: complete the expert gradients, then clip over all ranks.
    Returns the global gradient norm (before clipping)."""
    if ctx.cfg.ep > 1:
        sync_expert_grads(model, ctx)
    return clip_grad_norm(model, max_norm, ctx)
