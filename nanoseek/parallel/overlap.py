"""Computation–communication overlap in the MoE blocks under expert parallelism (`parallel.overlap=true`).

DeepSeek-V3 hides its expert all-to-all behind computation (technical report, §3.2.1): DualPipe pairs a
forward chunk of one micro-batch with a backward chunk of another and runs one's attention or experts
while the other's tokens are in flight. torch's pipeline schedules (`ScheduleDualPipeV`) decide which
micro-batch's forward and backward run when, per stage; they do not reach inside a layer. This module is
that inside part, written as plain code around one MoE block: the block's micro-batch is split into two
halves A and B (by sequence; a single sequence is split by token for the MoE only) and the halves are
interleaved, with every row exchange started asynchronously (`all_to_all_single(..., async_op=True)`):

  step  compute (this thread)                           in flight (collective threads / NCCL)
  1     attention(A), route(A), counts(A)               -
  2     attention(B), route(B), counts(B)               dispatch(A)
  3     experts(A)                                      dispatch(B)
  4     experts(B)                                      combine(A)
  5     shared experts(A), shared experts(B), sum(A)    combine(B)        (sum(A) after combine(A) lands)
  6     sum(B)                                          -

("counts": the tiny per-expert count exchange that sizes the row exchange; it stays synchronous.)
The backward mirrors it: each exchange is two autograd nodes, `_Start` and `_Wait`; the backward of
`_Wait` starts the reverse exchange of the gradient and returns at once, the backward of `_Start` waits
for it. PyTorch's autograd engine runs ready nodes newest-first, so everything the forward did between
the two (the other half's work) runs in the backward while the gradient rows are in flight.

The numbers are the plain path's: the same routing, one-process combine order and shared experts per
token; the balance loss is computed once over both halves' scores in the original token order and the
aux-free load counts are summed, so the MoE statistics are exactly those of the whole micro-batch.
Installed as `Block.overlapped_forward` (the model never imports this package). It runs eagerly under
`compile=true` (the compiled blocks' order of computation and exchanges would be the compiler's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.errors import warn
from nanoseek.model.block import Block
from nanoseek.model.moe import Dispatch, MoE, combine, dispatch, expert_mlp
from nanoseek.model.router import sequence_balance_loss
from nanoseek.parallel.expert_parallel import ExpertParallel, Route


# ---------------------------------------------------------------------------------------------- async exchange
class Exchange:
    """One asynchronous all_to_all_single of rows and, in the backward, its reverse: x [sum(in_splits), ...]
    goes in_splits[j] rows to rank j; out_splits[j] rows come from rank j. `trace`, when a list, gets
    (event, name) for every start and wait (tests and the benchmark read the schedule from it).
    `blocking`: wait as soon as started, forward and backward (the no-overlap control)."""

    def __init__(self, group, out_splits: list[int], in_splits: list[int], name: str = "", trace=None,
                 blocking: bool = False):
        self.group, self.out_splits, self.in_splits = group, out_splits, in_splits
        self.name, self.trace, self.blocking = name, trace, blocking
        self.work = self.grad_work = None
        self.sending = self.grad = None  # buffers the collective reads / writes until it completes

    def note(self, event: str) -> None:
        if self.trace is not None:
            self.trace.append((event, self.name))

    def start(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> tuple[torch.Tensor, object]:
        self.sending = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        work = dist.all_to_all_single(out, self.sending, out_splits, in_splits, group=self.group, async_op=True)
        return out, work


class _Start(torch.autograd.Function):
    """Forward: start sending x, return the receive buffer (valid only after `_Wait`). Backward: wait for
    the reverse exchange that `_Wait.backward` started, return the gradient it brought."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ex: Exchange) -> torch.Tensor:
        ctx.ex = ex
        out, ex.work = ex.start(x, ex.out_splits, ex.in_splits)
        ex.note("start")
        if ex.blocking:
            ex.work.wait()
        return out

    @staticmethod
    def backward(ctx, _unused: torch.Tensor):
        ex = ctx.ex
        ex.note("grad wait")
        ex.grad_work.wait()
        grad, ex.grad, ex.grad_work, ex.sending = ex.grad, None, None, None
        return grad, None


class _Wait(torch.autograd.Function):
    """Forward: wait until the rows have arrived. Backward: start sending the gradient back the way the rows
    came, and return without waiting (`_Start.backward` waits, as late as autograd allows)."""

    @staticmethod
    def forward(ctx, received: torch.Tensor, ex: Exchange) -> torch.Tensor:
        ctx.ex = ex
        ex.note("wait")
        ex.work.wait()
        ex.work = ex.sending = None
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ex = ctx.ex
        ex.grad, ex.grad_work = ex.start(grad, ex.in_splits, ex.out_splits)
        ex.note("grad start")
        if ex.blocking:
            ex.grad_work.wait()
        return grad, None  # `_Start.backward` ignores it: the real gradient comes from the exchange


def start_all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, name: str = "",
                     trace=None, blocking: bool = False) -> tuple[torch.Tensor, Exchange]:
    """Start exchanging rows x (as `nanoseek.parallel.expert_parallel.all_to_all`); returns the receive
    buffer and the exchange to pass to `wait_all_to_all`. Differentiable, asynchronous both ways."""
    ex = Exchange(group, out_splits, in_splits, name, trace, blocking)
    return _Start.apply(x, ex), ex


def wait_all_to_all(received: torch.Tensor, ex: Exchange) -> torch.Tensor:
    """The rows `start_all_to_all` received, once they are there."""
    return _Wait.apply(received, ex)


# ---------------------------------------------------------------------------------------------- one half
@dataclass
class Half:
    """One half of the micro-batch on its way through the MoE block."""

    name: str  # "A" or "B"
    h: torch.Tensor  # [b, t, D] residual stream after attention
    x: torch.Tensor  # [b*t, D] the MoE input (normed)
    weights: torch.Tensor  # [b*t, K]
    idx: torch.Tensor  # [b*t, K]
    scores: torch.Tensor  # [b*t, E]
    plan: Dispatch
    route: Route | None = None
    in_flight: torch.Tensor | None = None  # rows being exchanged (read them only after the wait)
    exchange: Exchange | None = None


class OverlappedMoEBlock:
    """`Block.overlapped_forward` of a MoE block under EP: the two-half schedule of the module docstring.
    `trace`: set to a list to record the schedule, (event, name) per exchange start/wait and computation.
    `wait_at_once`: the same halves and operations, but every exchange is waited for as soon as it is
    started, forward and backward (nothing overlaps): the control that separates what splitting costs from
    what overlapping gains (benchmarks/moe_overlap.py)."""

    def __init__(self, wait_at_once: bool = False):
        self.trace: list[tuple[str, str]] | None = None
        self.wait_at_once = wait_at_once

    def note(self, event: str, name: str) -> None:
        if self.trace is not None:
            self.trace.append((event, name))

    @torch.compiler.disable  # eager: the order of the computation and the exchanges is the point (compile=true)
    def __call__(self, block: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 attn_mask: torch.Tensor | None) -> torch.Tensor:
        moe: MoE = block.mlp
        ep: ExpertParallel = moe.expert_dispatcher
        B, T, D = h.shape
        if B * T < 2:  # nothing to split: the plain block
            h = h + block.self_attn(block.input_layernorm(h), cos, sin, attn_mask)
            return h + moe(block.post_attention_layernorm(h))
        by_sequence = B >= 2
        if not by_sequence:  # attention needs the whole sequence: the halves share only the MoE
            h = h + block.self_attn(block.input_layernorm(h), cos, sin, attn_mask)
        cut = (B if by_sequence else T) + 1 >> 1
        halves = []
        for i, name in enumerate("AB"):  # steps 1 and 2
            if by_sequence:
                self.note("compute", f"attention {name}")
                h_i, cos_i, sin_i, mask_i = (half_of(t, i, cut) for t in (h, cos, sin, attn_mask))
                h_i = h_i + block.self_attn(block.input_layernorm(h_i), cos_i, sin_i, mask_i)
            else:
                h_i = h[:, :cut] if i == 0 else h[:, cut:]
            halves.append(self.route_and_send(name, moe, ep, block.post_attention_layernorm(h_i), h_i))
        for half in halves:  # steps 3 and 4
            self.experts_and_send_back(half, moe, ep)
        shared = []
        for half in halves:  # step 5
            self.note("compute", f"shared {half.name}")
            shared.append(moe.shared_experts(half.x) if moe.shared_experts is not None else None)
        outs = []
        for half, sh in zip(halves, shared):  # steps 5 and 6
            back = self.wait(half)
            self.note("compute", f"sum {half.name}")
            out = combine(back, half.plan, half.weights)
            if sh is not None:
                out = out + sh
            outs.append(half.h + out.view_as(half.h))
        record_routing(moe, halves, B)
        return torch.cat(outs, dim=0 if by_sequence else 1)

    def route_and_send(self, name: str, moe: MoE, ep: ExpertParallel, x: torch.Tensor, h: torch.Tensor) -> Half:
        """Route one half, exchange its counts and start sending its rows (dispatch)."""
        self.note("compute", f"route {name}")
        flat = x.reshape(-1, x.shape[-1])
        weights, idx, scores = moe.gate(flat)
        rows, plan = dispatch(flat, idx, ep.n_experts)
        half = Half(name, h, flat, weights, idx, scores, plan, ep.route(plan.counts))
        self.start(half, rows, half.route.got, half.route.sent, ep, "dispatch")
        if ep.meter is not None:
            ep.meter.record(idx, half.route.sent, flat.shape[1] * flat.element_size(), ep.me, ep.node_of,
                            experts_per_node=ep.n_local * ep.ranks_per_node)
        return half

    def start(self, half: Half, rows: torch.Tensor, out_splits: list[int], in_splits: list[int], ep: ExpertParallel,
              name: str) -> None:
        half.in_flight, half.exchange = start_all_to_all(rows, out_splits, in_splits, ep.group, f"{name} {half.name}",
                                                         self.trace, blocking=self.wait_at_once)

    def wait(self, half: Half) -> torch.Tensor:
        return wait_all_to_all(half.in_flight, half.exchange)

    def experts_and_send_back(self, half: Half, moe: MoE, ep: ExpertParallel) -> None:
        """Wait for one half's rows, run the local experts on them, start sending the outputs back (combine)."""
        route = half.route
        received = self.wait(half).index_select(0, route.order)
        self.note("compute", f"experts {half.name}")
        out = expert_mlp(received, *ep.local_weights(moe.experts), route.offsets, moe.experts.grouped_mm)
        source_major = torch.empty_like(out).index_copy(0, route.order, out)
        self.start(half, source_major, route.sent, route.got, ep, "combine")


def half_of(t: torch.Tensor | None, i: int, cut: int) -> torch.Tensor | None:
    """Sequences [:cut] (i = 0) or [cut:] (i = 1) of a batch-first tensor; one shared by all (batch 1) as is."""
    if t is None or t.shape[0] == 1:
        return t
    return t[:cut] if i == 0 else t[cut:]


def record_routing(moe: MoE, halves: list[Half], batch: int) -> None:
    """What `MoE.forward` records in training, for the whole micro-batch: the load counts summed over the
    halves, and the balance loss over both halves' scores in the original token order (the same tensors
    the plain path sees, so the same numbers, per sequence or batch-wise)."""
    moe.balance_loss = None
    if not moe.training:
        return
    counts = sum(half.plan.counts for half in halves)
    moe.expert_load += counts.to(moe.expert_load.dtype)
    alpha = moe.cfg.aux_loss_alpha
    if alpha > 0:
        scores = torch.cat([half.scores for half in halves])
        idx = torch.cat([half.idx for half in halves])
        moe.balance_loss = sequence_balance_loss(scores, idx, moe.cfg.n_routed_experts, idx.shape[1], batch,
                                                 alpha, moe.cfg.seq_aux)


def install_overlap(model: nn.Module, ep_size: int) -> int:
    """Give every MoE block whose experts are spread over EP ranks the overlapped forward. Returns how many."""
    if ep_size < 2:
        warn("parallel.overlap has no effect without expert parallelism (parallel.ep > 1): no all-to-all to hide")
        return 0
    blocks = [b for b in model.modules() if isinstance(b, Block) and isinstance(b.mlp, MoE)
              and isinstance(b.mlp.expert_dispatcher, ExpertParallel)]
    for block in blocks:
        block.overlapped_forward = OverlappedMoEBlock()
    return len(blocks)
