"""The DeepSeekMoE gate (DeepSeek-V3 technical report, §2.1.2): scores, group-limited top-k, and load
balancing.

V3 (`noaux_tc`): sigmoid scores; the per-expert bias `e_score_correction_bias` is added for *selection
only*; groups are ranked by the sum of their top-2 biased scores; weights come from the unbiased scores,
are normalised to sum 1 and multiplied by `routed_scaling_factor`.
V2 (`group_limited_greedy` / `greedy`): softmax scores, groups ranked by their max, no bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


def route(scores: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
          group_by_top2: bool) -> torch.Tensor:
    """Pick `top_k` experts per row of `scores` [N, E]; returns indices [N, top_k].

    `bias` shifts selection only. Groups: keep the `topk_group` best of `n_group` groups, by the sum of
    the top-2 (V3) or the max (V2) of each group's selection scores; other groups' experts are -inf.
    """
    choice = scores if bias is None else scores + bias
    if n_group > 1:
        grouped = choice.view(choice.shape[0], n_group, -1)
        group_score = grouped.topk(2, dim=-1).values.sum(-1) if group_by_top2 else grouped.amax(-1)
        kept = group_score.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view_as(choice)
    return choice.topk(top_k, dim=-1).indices


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        # Kept in fp32 whatever the model dtype: routing decisions are sensitive to rounding.
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        # Optional idx -> idx callable run on every routing decision: records it or replays given experts
        # (GRPO's training-inference consistency checks and routing replay, nanoseek.r1.consistency).
        self.route_hook = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, K] fp32, expert indices [N, K], scores [N, E] fp32)."""
        cfg = self.cfg
        scores = self.scores(x)
        use_bias = cfg.topk_method == "noaux_tc"
        grouped = cfg.topk_method != "greedy"
        idx = route(scores, self.e_score_correction_bias.float() if use_bias else None, self.top_k,
                    cfg.n_group if grouped else 1, cfg.topk_group, group_by_top2=use_bias)
        if self.route_hook is not None:
            idx = self.route_hook(idx)
        weights = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, idx, scores


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, n_experts: int, top_k: int,
                          batch: int, alpha: float, per_sequence: bool = True) -> torch.Tensor:
    """The complementary balance loss L = alpha * sum_i f_i P_i (DeepSeek-V3 technical report, §2.1.2).

    Per sequence (V3) by default; `per_sequence=False` treats the batch as one sequence, which is the
    classic batch-wise auxiliary loss of earlier MoEs (used for the balancing comparison).
    scores [B*T, E], idx [B*T, K].
    """
    groups = batch if per_sequence else 1
    probs = scores / scores.sum(-1, keepdim=True)
    probs = probs.view(groups, -1, n_experts)
    tokens = probs.shape[1]
    counts = torch.zeros(groups, n_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, idx.view(groups, -1), torch.ones_like(idx.view(groups, -1), dtype=scores.dtype))
    f = counts * (n_experts / (top_k * tokens))
    return alpha * (f * probs.mean(1)).sum(-1).mean()
