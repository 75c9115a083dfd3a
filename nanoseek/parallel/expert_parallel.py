"""Expert parallelism: the routed experts of each MoE layer are split over the `ep` ranks of the mesh.

Per MoE forward (DeepSeek-V3 technical report, §3.2.2; the all-to-all is `all_to_all_single`):
  1. sort this rank's token copies by expert (`nanoseek.model.moe.dispatch`, as in one process);
  2. exchange the per-expert counts, so every rank knows how many rows it will receive from whom;
  3. send the rows to the ranks that hold their experts (all-to-all; its backward is the reverse exchange);
  4. regroup the received rows by local expert and run one grouped GEMM over the local experts;
  5. send the outputs back (the reverse all-to-all) and combine them exactly as one process does: the same
     fixed permutation and the same summation order, so the result does not depend on the layout.
Attention, shared experts and dense layers stay data parallel (FSDP2, nanoseek.parallel.fsdp).

The expert weights become DTensors on the (dp_shard, ep) mesh, sharded over `ep` along the expert dim and
replicated over `dp_shard`: checkpoints see the global [E, ...] tensors (and reshard on load), the forward
uses the local slice. Their gradients are complete on the owning rank once the backward all-to-all has run
(every token that used an expert sent its gradient there); `sync_expert_grads` sums them over the
`dp_shard` replicas and divides by the data-parallel size, matching FSDP's average for the other weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from nanoseek.model.moe import GroupedExperts, MoE, combine, dispatch, expert_mlp
from nanoseek.parallel.mesh import ParallelContext
from nanoseek.parallel.traffic import TrafficMeter


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows x [sum(in_splits), ...]: in_splits[j] go to rank j; returns the rows received, out_splits[j]
    from rank j, in rank order. Differentiable."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class Route:
    """What the per-expert counts exchange tells a rank: how many rows it sends to / gets from each EP rank,
    and how the rows it gets map onto its local experts."""

    order: torch.Tensor  # received position (source-major) of each local-expert-sorted row
    offsets: torch.Tensor  # [E_local] int32 cumulative rows per local expert (grouped_mm's `offs`)
    sent: list[int]  # rows this rank sends to each EP rank
    got: list[int]  # rows this rank receives from each EP rank


@dataclass
class Received:
    """Rows another rank's experts get from dispatch, and how to send their outputs back."""

    rows: torch.Tensor  # [M, D] sorted by local expert (stable: by source rank within an expert)
    offsets: torch.Tensor  # [E_local] int32 cumulative rows per local expert (grouped_mm's `offs`)
    order: torch.Tensor  # received position (source-major) of each row of `rows`
    sent: list[int]  # rows this rank sent to each EP rank
    got: list[int]  # rows this rank received from each EP rank


class ExpertParallel:
    """The `MoE.expert_dispatcher` of one MoE layer under EP."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int, ranks_per_node: int | None = None,
                 meter: TrafficMeter | None = None):
        """`ranks_per_node`: EP ranks on one (possibly simulated) node, default all; `meter` counts traffic."""
        self.group = group
        self.ep = dist.get_world_size(group)
        self.me = dist.get_rank(group)
        self.n_experts = n_experts
        self.n_local = n_experts // self.ep
        self.ranks_per_node = min(ranks_per_node or self.ep, self.ep)
        self.meter = meter

    def node_of(self, ep_rank: int) -> int:
        return ep_rank // self.ranks_per_node

    def local_weights(self, experts: GroupedExperts) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's experts' weights: the local shard of the DTensors (or a slice of full tensors)."""
        lo, hi = self.me * self.n_local, (self.me + 1) * self.n_local
        return tuple(p.to_local() if isinstance(p, DTensor) else p[lo:hi]
                     for p in (experts.gate_up_proj, experts.down_proj))

    def route(self, counts: torch.Tensor) -> Route:
        """Exchange the per-expert counts [E] of this rank's rows (sorted by global expert)."""
        incoming = torch.empty_like(counts)
        dist.all_to_all_single(incoming, counts.contiguous(), group=self.group)  # [source, local expert]
        incoming = incoming.view(self.ep, self.n_local)
        local_expert = torch.arange(self.n_local, device=counts.device).repeat(self.ep)
        order = local_expert.repeat_interleave(incoming.reshape(-1)).argsort(stable=True)
        offsets = incoming.sum(0).cumsum(0).to(torch.int32)
        return Route(order, offsets, sent=counts.view(self.ep, self.n_local).sum(1).tolist(),
                     got=incoming.sum(1).tolist())

    def send(self, rows: torch.Tensor, counts: torch.Tensor) -> Received:
        """Rows [N*K, D] sorted by (global) expert with counts [E] -> the rows of this rank's experts."""
        route = self.route(counts)
        received = all_to_all(rows, route.got, route.sent, self.group)
        return Received(received.index_select(0, route.order), route.offsets, route.order, route.sent, route.got)

    def send_back(self, out: torch.Tensor, batch: Received) -> torch.Tensor:
        """Expert outputs in `batch.rows` order -> this rank's rows, in the order `send` got them."""
        source_major = torch.empty_like(out).index_copy(0, batch.order, out)
        return all_to_all(source_major, batch.sent, batch.got, self.group)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                 experts: GroupedExperts) -> tuple[torch.Tensor, torch.Tensor]:
        rows, plan = dispatch(x, idx, self.n_experts)
        batch = self.send(rows, plan.counts)
        out = expert_mlp(batch.rows, *self.local_weights(experts), batch.offsets, experts.grouped_mm)
        if self.meter is not None:
            self.meter.record(idx, batch.sent, x.shape[1] * x.element_size(), self.me, self.node_of,
                              experts_per_node=self.n_local * self.ranks_per_node)
        return combine(self.send_back(out, batch), plan, weights), plan.counts


def apply_expert_parallel(model: nn.Module, ctx: ParallelContext,
                          meter: TrafficMeter | None = None) -> set[nn.Parameter]:
    """Shard every MoE layer's routed experts over the EP group and install the dispatcher. Returns the
    expert parameters (FSDP2 must leave them alone)."""
    mesh = ctx.mesh["dp_shard", "ep"]
    expert_params: set[nn.Parameter] = set()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.expert_dispatcher = ExpertParallel(ctx.ep_group, moe.cfg.n_routed_experts, ctx.cfg.ranks_per_node, meter)
        for name, param in list(moe.experts.named_parameters(recurse=False)):
            sharded = nn.Parameter(distribute_tensor(param.data, mesh, [Replicate(), Shard(0)]))
            setattr(moe.experts, name, sharded)
            expert_params.add(sharded)
    return expert_params


def is_expert_param(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor) and p.placements == (Replicate(), Shard(0))


@torch.no_grad()
def sync_expert_grads(model: nn.Module, ctx: ParallelContext) -> None:
    """Sum the expert gradients over the dp_shard replicas and divide by the data-parallel size (the
    same mean over all ranks' losses that FSDP2 applies to the other weights)."""
    for p in model.parameters():
        if p.grad is not None and is_expert_param(p):
            g = p.grad.to_local()
            if ctx.cfg.dp_shard > 1:
                dist.all_reduce(g, group=ctx.dp_shard_group)
            g.div_(ctx.dp_size)
