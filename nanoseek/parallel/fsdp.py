"""FSDP2 (`fully_shard`) over the data-parallel ranks: every transformer block (the MTP modules' too) is its
own unit (its weights are gathered just before it runs and freed after), the root holds the embedding, the
final norm and the output head. Gradients are reduce-scattered and the optimizer state, created from the
sharded parameters, is sharded with them.

Precision: on GPU the blocks compute in bf16 and reduce gradients in fp32 (`MixedPrecisionPolicy`); the
sharded master weights and the optimizer stay fp32. On CPU everything is fp32, so a sharded run matches
one process to rounding. Expert weights under EP are sharded by nanoseek.parallel.expert_parallel and
left out here (`ignored_params`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from nanoseek.parallel.expert_parallel import is_expert_param
from nanoseek.parallel.mesh import ParallelContext


def precision_policy(device: torch.device) -> MixedPrecisionPolicy:
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # fp32 throughout


def apply_fsdp(model: nn.Module, ctx: ParallelContext, ignored: set[nn.Parameter]) -> None:
    """fully_shard each block (the trunk's and each MTP module's), then the root, over the flattened dp mesh.
    An MTP module's norms and projection stay with the root: the output head is applied through
    `mtp_logits` outside the module's own forward, while the root's weights are gathered."""
    policy = precision_policy(ctx.device)
    units = [*model.model.layers, *(m.block for m in model.mtp)]
    for unit in units:
        mine = {p for p in unit.parameters() if p in ignored}
        fully_shard(unit, mesh=ctx.dp_mesh, mp_policy=policy, ignored_params=mine or None)
    fully_shard(model, mesh=ctx.dp_mesh, mp_policy=policy, ignored_params=set(ignored) or None)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, ctx: ParallelContext) -> float:
    """The global gradient norm over all ranks (every element counted once), and clipping to `max_norm`
    (as torch.nn.utils.clip_grad_norm_ in one process: scale by max_norm / (norm + 1e-6) when above).
    FSDP shards hold each element on one rank; expert shards are repeated over the dp_shard replicas;
    anything else is repeated on every data-parallel rank. The sum runs over the whole world, so each
    pipeline stage (the outer mesh dim) adds its own weights once. Each kind's local norm is one foreach
    reduction (torch.nn.utils.get_total_norm), as in torch's own clipping: a few ops, not a few per tensor."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    kinds: dict[float, list[torch.Tensor]] = {}  # weight of a squared element in the world's sum -> tensors
    for g in grads:
        weight = 1 / ctx.cfg.dp_shard if is_expert_param(g) else 1.0 if isinstance(g, DTensor) else 1 / ctx.dp_size
        kinds.setdefault(weight, []).append(g.to_local() if isinstance(g, DTensor) else g)
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for weight, local in kinds.items():
        total += torch.nn.utils.get_total_norm(local, foreach=True).double().square() * weight
    dist.all_reduce(total)
    norm = math.sqrt(float(total))
    coef = max_norm / (norm + 1e-6)
    if coef < 1 and math.isfinite(norm):
        torch._foreach_mul_([local for tensors in kinds.values() for local in tensors], coef)
    return norm
