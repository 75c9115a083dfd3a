"""One call that lays a model out on the mesh: experts over EP, then FSDP2 over the data-parallel ranks; with
`parallel.pp > 1` the model is first cut into pipeline stages (nanoseek.parallel.pipeline)."""

from __future__ import annotations

from torch import nn

from nanoseek.parallel.expert_parallel import apply_expert_parallel, sync_expert_grads
from nanoseek.parallel.fsdp import apply_fsdp, clip_grad_norm
from nanoseek.parallel.mesh import ParallelContext
from nanoseek.parallel.pipeline import Pipeline
from nanoseek.parallel.overlap import install_overlap
from nanoseek.parallel.traffic import TrafficMeter


def parallelize(model: nn.Module, ctx: ParallelContext, meter: TrafficMeter | None = None) -> nn.Module:
    """Shard `model` in place (every rank must have built it identically, e.g. from the same seed).
    `meter` collects the EP all-to-all traffic. On the trivial mesh of one process the model stays as it is
    (like torchtitan, no FSDP2 over a single rank: plain tensors, no gathers)."""
    experts = apply_expert_parallel(model, ctx, meter) if ctx.cfg.ep > 1 else set()
    if ctx.cfg.overlap and (ctx.cfg.ep > 1 or ctx.is_main):  # its warning for ep=1: once, not once per rank
        install_overlap(model, ctx.cfg.ep)
    if ctx.world_size > 1:
        apply_fsdp(model, ctx, experts)
    return model


def parallelize_pipeline(model: nn.Module, ctx: ParallelContext, meter: TrafficMeter | None = None) -> Pipeline:
    """Keep this rank's pipeline stages of `model` (pruned in place), with EP and FSDP2 inside the stage."""
    return Pipeline(model, ctx, meter)


def finish_gradients(model: nn.Module, ctx: ParallelContext, max_norm: float,
                     pipeline: Pipeline | None = None) -> float:
    """After the last backward of a step: add the MTP embedding's gradient to the embedding's (pipeline),
    complete the expert gradients, then clip over all ranks. Returns the global gradient norm (before clipping)."""
    if pipeline is not None:
        pipeline.fold_mirror_grad()
    if ctx.cfg.ep > 1:
        sync_expert_grads(model, ctx)
    return clip_grad_norm(model, max_norm, ctx)
