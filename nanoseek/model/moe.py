"""DeepSeekMoE: fine-grained routed experts + always-on shared experts (DeepSeek-V3 technical report,
§2.1.2; docs/design.md).

The routed path is three separable steps; expert parallelism swaps in its own (`MoE.expert_dispatcher`):
  dispatch  - sort token copies by expert (an all-to-all under EP),
  compute   - one grouped GEMM over the expert-sorted rows (`torch.nn.functional.grouped_mm`),
  combine   - un-sort, weight by the router and sum the K copies of each token.
The combine gathers by a fixed permutation and sums in a fixed order, so results are deterministic.

Very few tokens on CPU (decoding at batch 1) take another route to the same sum: one matmul pair per
expert that received tokens (`GroupedExperts.per_expert`). CPU `grouped_mm` pays per expert, empty or
not, which then costs more than the experts themselves. On accelerators the grouped GEMM is one kernel
and needs no host sync, so it is always used there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.ffn import FFN
from nanoseek.model.linear import GroupedGemm, grouped_gemm
from nanoseek.model.router import Router, sequence_balance_loss


@dataclass
class Dispatch:
    order: torch.Tensor  # [N*K] positions into the flattened (token, k) list, sorted by expert
    offsets: torch.Tensor  # [E] int32 cumulative row counts per expert (grouped_mm's `offs`)
    counts: torch.Tensor  # [E] tokens routed to each expert


def dispatch(x: torch.Tensor, idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, Dispatch]:
    """Copy each token once per chosen expert, grouped by expert. x [N, D], idx [N, K] -> [N*K, D]."""
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    rows = x.index_select(0, order // idx.shape[1])  # backward is index_add_, cheaper than index_put
    return rows, Dispatch(order, counts.cumsum(0).to(torch.int32), counts)


def combine(rows: torch.Tensor, plan: Dispatch, weights: torch.Tensor) -> torch.Tensor:
    """Inverse of `dispatch`: rows [N*K, D] (expert order) -> [N, D] weighted sum over the K experts."""
    n, k = weights.shape
    unsorted = torch.empty_like(rows).index_copy_(0, plan.order, rows).view(n, k, -1)
    return (unsorted * weights.unsqueeze(-1).to(rows.dtype)).sum(1)


@torch.compiler.disable  # grouped_mm's fake-tensor rule only admits bf16 (CUDA); run it eagerly
def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, in] rows sorted by group, w [E, in, out] -> [M, out]."""
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's op list
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    else:
        w = w.to(x.dtype)
    if (x.shape[1] * x.element_size()) % 16 == 0 and (w.shape[2] * w.element_size()) % 16 == 0:
        return F.grouped_mm(x, w, offs=offsets)
    # grouped_mm needs 16-byte aligned rows (dims a multiple of 8 in bf16, of 4 in fp32). Only odd toy
    # sizes get here: one matmul per expert.
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]]).tolist()
    return torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, offsets.tolist()))])


def expert_mlp(rows: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
               offsets: torch.Tensor, mm: GroupedGemm | None = None) -> torch.Tensor:
    """The routed experts' SwiGLU as two grouped GEMMs: rows [M, D] sorted by expert, weights
    [E, 2I, D] / [E, D, I], offsets [E] -> [M, D]. Expert parallelism calls it on its local experts.
    `mm`: the experts' GEMM (`GroupedExperts.grouped_mm`, e.g. FP8), None = `_grouped_mm`."""
    mm = mm or _grouped_mm
    gate, up = mm(rows, gate_up_proj.transpose(1, 2), offsets).chunk(2, dim=-1)
    return mm(F.silu(gate) * up, down_proj.transpose(1, 2), offsets)


class GroupedExperts(nn.Module):
    """All routed experts' weights as 3-D tensors (the layout transformers uses in memory):
    gate_up_proj [E, 2I, D] (gate rows first), down_proj [E, D, I]."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        # The GEMM installed by `nanoseek.model.linear.set_grouped_gemm` when built (FP8), None = default
        self.grouped_mm = grouped_gemm()

    def forward(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows [N*K, D] sorted by expert (see `dispatch`) -> each row through its expert."""
        return expert_mlp(rows, self.gate_up_proj, self.down_proj, offsets, self.grouped_mm)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Routed expert e on rows x [n, D]: down(silu(gate(x)) * up(x))."""
        if self.grouped_mm is not None:  # the installed GEMM, on one group
            offsets = torch.tensor([x.shape[0]], dtype=torch.int32, device=x.device)
            return expert_mlp(x, self.gate_up_proj[e:e + 1], self.down_proj[e:e + 1], offsets, self.grouped_mm)
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def per_expert(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """sum_k w_k E_{idx_k}(x) for x [N, D], computing only the experts that received tokens."""
        N, K = idx.shape
        if N == 1:  # one token (batch-1 decoding): no sorting, just its K experts
            return sum(w * self.expert(x, e) for e, w in zip(idx[0].tolist(), weights[0].tolist()))
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        rows = x[order // K]
        outs, first = [], 0
        for e, count in enumerate(torch.bincount(flat, minlength=self.down_proj.shape[0]).tolist()):
            if count:
                outs.append(self.expert(rows[first:first + count], e))
                first += count
        out = torch.empty_like(rows).index_copy(0, order, torch.cat(outs)).view(N, K, -1)
        return torch.bmm(weights.to(x.dtype).unsqueeze(1), out).squeeze(1)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (FFN(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        # Tokens per expert accumulated since the last bias update (across micro-batches).
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None  # set by forward in training when alpha > 0
        # Routed-expert computation, swappable: None computes locally; expert parallelism installs an
        # object called as dispatcher(x [N, D], weights [N, K], idx [N, K], experts) -> (out [N, D],
        # counts [E] of this rank's token copies per expert) (nanoseek.parallel.expert_parallel).
        self.expert_dispatcher = None
        # The process group `update_bias` sums the loads over: None = the default group (every rank holds this
        # layer); pipeline parallelism sets the data-parallel group of the stage that holds it.
        self.balance_group = None

    def few_tokens(self, x: torch.Tensor) -> bool:
        """Whether routed experts run one by one (`GroupedExperts.per_expert`): on CPU, when the token
        copies (N * top_k) are at most a quarter of the experts. Measured on one CPU thread (bench preset
        sizes, 16 to 128 experts): below that the loop over the used experts is faster, above it
        `grouped_mm` is (at 16 experts and top-4: 190 vs 235 us for one token, 350 vs 290 us for two)."""
        copies = x.shape[0] * self.cfg.num_experts_per_tok
        return x.device.type == "cpu" and 4 * copies <= self.cfg.n_routed_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, idx, scores = self.gate(flat)
        if self.expert_dispatcher is not None:
            out, counts = self.expert_dispatcher(flat, weights, idx, self.experts)
        elif self.few_tokens(flat):
            out, counts = self.experts.per_expert(flat, weights, idx), None
        else:
            rows, plan = dispatch(flat, idx, self.cfg.n_routed_experts)
            out, counts = combine(self.experts(rows, plan.offsets), plan, weights), plan.counts
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.balance_loss = None
        if self.training:
            if counts is None:
                counts = torch.bincount(idx.reshape(-1), minlength=self.cfg.n_routed_experts)
            self.expert_load += counts.to(self.expert_load.dtype)
            alpha = self.cfg.aux_loss_alpha
            self.balance_loss = (sequence_balance_loss(scores, idx, self.cfg.n_routed_experts, idx.shape[1], B,
                                                       alpha, self.cfg.seq_aux) if alpha > 0 else None)
        return out.view(B, T, D)

    @torch.no_grad()
    def update_bias(self, gamma: float, center: bool = False) -> torch.Tensor:
        """Auxiliary-loss-free balancing step: b_i += gamma * sign(mean(c) - c_i), with c the loads since
        the last call (summed over the data-parallel ranks that hold this layer, `balance_group`, when
        torch.distributed is initialised).
        `center=True` also subtracts the mean update (torchtitan's variant). Returns the loads used."""
        load = self.expert_load.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load, group=self.balance_group)
        delta = gamma * torch.sign(load.mean() - load)
        if center:
            delta -= delta.mean()
        self.gate.e_score_correction_bias += delta
        self.expert_load.zero_()
        return load
