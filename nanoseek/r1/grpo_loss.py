"""GRPO's math, separate from rollouts and training so it can be checked by hand (DeepSeekMath §4.1;
formulas in docs/design.md).

For a prompt q the policy samples a group of G completions o_1..o_G with rewards r_i. Every token of
o_i gets the advantage A_i = (r_i - mean(r)) / std(r) (Dr. GRPO: no division by std). The objective,
maximized, is

    J = sum_{i,t} w_{i,t} [ min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high) A_i)
                            - beta * KL_{i,t} ]

with rho = pi_theta / pi_old per token and KL the k3 estimator pi_ref/pi_theta - log(pi_ref/pi_theta) - 1.
The variants differ in the token weights w and a few switches:

=========  =========================================  ===========  ============================
variant    w_{i,t} (m = completion mask)              advantage    other
=========  =========================================  ===========  ============================
grpo       m / (N |o_i|): mean per sequence, then     std-normed   eps 0.2 both sides
           over the N sequences
dr_grpo    m / (N L): L a constant (max_new_tokens)   no std       removes the length bias
dapo       m / sum(m): token-level mean over batch    std-normed   eps_high 0.28, drops groups
                                                                   with all-equal rewards
gspo       1/N per sequence, ratio s_i =              std-normed   eps 3e-4 / 4e-4
           exp(mean_t log rho_{i,t})
=========  =========================================  ===========  ============================

The loss is computed as a weighted *sum* with weights normalized over the whole rollout batch,
so a batch split into micro-batches gives exactly the same gradient as one big batch, and a batch
split over data-parallel ranks (each holding whole groups) the same as one process.

Standard deviation: the unbiased (n - 1) estimate, as TRL and verl use (`torch.std`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_VARIANTS = ("grpo", "dr_grpo", "dapo", "gspo")

# (eps_low, eps_high) when the config leaves them at 0. GSPO clips the sequence-level ratio, which
# moves far less than a token ratio, hence its tiny range (GSPO paper, section 5.1).
DEFAULT_EPS = {"grpo": (0.2, 0.2), "dr_grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "gspo": (3e-4, 4e-4)}


def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Rewards [N] ordered group by group (N = groups * group_size) -> advantages [N]:
    r - mean(group), divided by std(group) + eps when `scale_std`. A group whose rewards are all
    equal gets zero advantage: it carries no signal about which completion is better."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if scale_std and group_size > 1:
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    return centered.view(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool [groups]: groups whose rewards are not all equal (DAPO's dynamic sampling keeps these)."""
    r = rewards.view(-1, group_size)
    return (r.max(dim=1).values - r.min(dim=1).values) > 0


def token_weights(mask: torch.Tensor, variant: str, max_len: int | None = None,
                  totals: tuple[int, int] | None = None) -> torch.Tensor:
    """[N, T] weights w_{i,t} of the variant (see the module table), zero where mask is 0.
    Sequences whose mask is all zero (e.g. masked-out truncations) do not count in N.
    `totals`: (counted sequences, counted tokens) of the whole batch when `mask` is only this rank's
    part of it (data parallelism): the normalisers are then the batch's, so the ranks' weights
    together equal one process's weights on the whole batch."""
    mask = mask.float()
    lengths = mask.sum(dim=1, keepdim=True)
    n_seq = (lengths > 0).sum().clamp(min=1) if totals is None else max(totals[0], 1)
    n_tok = mask.sum().clamp(min=1) if totals is None else max(totals[1], 1)
    if variant in ("grpo", "gspo"):
        return mask / lengths.clamp(min=1) / n_seq
    if variant == "dr_grpo":
        if not max_len:
            raise ValueError("dr_grpo needs the constant length max_len")
        return mask / (n_seq * max_len)
    if variant == "dapo":
        return mask / n_tok
    raise ValueError(f"unknown loss variant {variant!r}; choose one of {', '.join(LOSS_VARIANTS)}")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = log pi_ref - log
    pi_theta. Non-negative, unbiased, lower variance than -d."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to minimize: pg_loss + beta * kl
    pg_loss: torch.Tensor  # -(weighted clipped surrogate), detached
    kl: torch.Tensor  # weighted mean k3 KL (0 without a reference), detached
    clip_frac: float  # share of tokens (gspo: sequences) where the clipped branch is active
    ratio_mean: float


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                weights: torch.Tensor, *, variant: str = "grpo", eps_low: float = 0.2,
                eps_high: float = 0.2, beta: float = 0.0,
                ref_logp: torch.Tensor | None = None) -> LossOutput:
    """The clipped objective, negated. logp / old_logp / ref_logp: [N, T] log-probs of the sampled
    tokens under pi_theta (with grad), pi_old and pi_ref; advantages [N]; weights [N, T] from
    `token_weights` (zero off the completion)."""
    mask = weights > 0
    adv = advantages[:, None].to(logp.dtype)
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))
    if variant == "gspo":
        seq_w = weights.sum(dim=1)  # 1/N for every counted sequence
        lengths = mask.sum(dim=1).clamp(min=1)
        ratio = torch.exp(log_ratio.sum(dim=1) / lengths)
        unclipped = ratio * advantages
        clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
        pg = -(torch.minimum(unclipped, clipped) * seq_w).sum()
        active = (clipped < unclipped) & (seq_w > 0)
        clip_frac = active.float().sum() / (seq_w > 0).float().sum().clamp(min=1)
        ratio_mean = (ratio * (seq_w > 0)).sum() / (seq_w > 0).float().sum().clamp(min=1)
    else:
        ratio = torch.exp(log_ratio)
        unclipped = ratio * adv
        clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
        pg = -(torch.minimum(unclipped, clipped) * weights).sum()
        active = (clipped < unclipped) & mask
        clip_frac = active.float().sum() / mask.float().sum().clamp(min=1)
        ratio_mean = (ratio * mask).sum() / mask.float().sum().clamp(min=1)
    loss = pg
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None:
        kl = (k3_kl(logp, ref_logp) * weights).sum()
        loss = loss + beta * kl
    return LossOutput(loss, pg.detach(), kl.detach(), float(clip_frac), float(ratio_mean.detach()))


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, T, V], ids [N, T] -> (log-prob of token t given the prefix, entropy of that
    distribution), both [N, T] and aligned with the *tokens* (position 0 has no prediction: 0).
    Logits are divided by the sampling temperature, as the engine's reported log-probs are."""
    logp_all = (logits[:, :-1].float() / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros_like(logp[:, :1])
    return torch.cat([zero, logp], dim=1), torch.cat([zero, entropy], dim=1)
