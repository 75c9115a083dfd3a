"""GRPO's loss function for the training core: one micro-batch of a rollout batch through the
clipped objective of `grpo_loss` (log pi_theta recomputed with gradients)."""

from __future__ import annotations

import torch

from nanoseek.r1.configs import GRPOConfig
from nanoseek.r1.consistency import RouteCheck, logp_gap
from nanoseek.r1.grpo_loss import policy_loss, sequence_logprobs
from nanoseek.r1.grpo_ranks import DataParallelRanks


def grpo_loss_fn(cfg: GRPOConfig, ranks: DataParallelRanks | None = None):
    """loss_fn(model, micro_batch) for the core: the clipped objective on one micro-batch.

    The core averages metrics over the `grad_accum` micro-batches, so every metric is reported
    pre-scaled to make that average the whole batch's value: sums (loss, pg_loss, kl) times the
    number of micro-batches, means (clip_frac, ratio, entropy) times this micro-batch's share of
    the batch's tokens (gspo: sequences) times that number. A micro-batch with nothing to learn
    (all truncated and masked) then contributes exactly zero.

    Data-parallel ranks (`ranks`): the token weights are already normalised over every rank's rows,
    so the ranks' losses add up to the one-process loss; each is multiplied by the number of ranks
    because the gradients are averaged over them (FSDP2), and so are the metrics, which the core
    averages. With a sharded model every rank runs the forward even on a micro-batch with nothing to
    learn: its forwards and backwards are collectives that all ranks must join.

    Training-inference consistency (first inner step of each rollout batch, see
    nanoseek.r1.consistency): `logp_gap_mean`, `logp_gap_max` and, for MoE, `routing_mismatch`;
    the max is carried across the micro-batches and reported by the last one."""
    eps_low, eps_high = cfg.clip_range
    ranks = ranks or DataParallelRanks()
    gap_max = [0.0]  # running max over the micro-batches of the current step

    def loss_fn(model, mb: dict):
        device = next(model.parameters()).device
        ids = mb["input_ids"].to(device)
        weights = mb["weights"].to(device)
        mask = weights > 0
        metrics = dict(mb["stats"])
        check = RouteCheck(mb["routes"], replay=cfg.replay_routing)
        if not mask.any() and not ranks.lockstep:  # nothing to learn in this micro-batch
            metrics.update(loss=0.0, pg_loss=0.0, kl=0.0, clip_frac=0.0, ratio=0.0, entropy=0.0)
            if mb["measure"]:  # still measured: the diagnostics must see every sampled token
                with torch.no_grad(), check.on(model):
                    logits = model(ids, attention_mask=mb["attention_mask"].to(device)).logits
                metrics.update(consistency(mb, sequence_logprobs(logits, ids, cfg.temperature)[0], check))
            return torch.zeros((), device=device, requires_grad=True), metrics
        with check.on(model):
            logits = model(ids, attention_mask=mb["attention_mask"].to(device)).logits
        logp, entropy = sequence_logprobs(logits, ids, cfg.temperature)
        if mb["measure"]:
            metrics.update(consistency(mb, logp, check))
        old = mb["old_logp"].to(device) if mb["old_logp"] is not None else logp.detach()
        ref = mb["ref_logp"].to(device) if mb["ref_logp"] is not None else None
        out = policy_loss(logp, old, mb["advantages"].to(device), weights, variant=cfg.loss,
                          eps_low=eps_low, eps_high=eps_high, beta=cfg.beta, ref_logp=ref)
        # weights are normalized over the whole batch; the core divides by micro-batches, FSDP2 by ranks
        scale = mb["scale"] * ranks.size
        token_share = scale * int(mask.sum()) / max(mb["batch_tokens"], 1)
        share = scale * int(mask.any(1).sum()) / max(mb["batch_seqs"], 1) if cfg.loss == "gspo" \
            else token_share
        metrics.update(loss=out.loss.item() * scale, pg_loss=out.pg_loss.item() * scale,
                       kl=out.kl.item() * scale, clip_frac=out.clip_frac * share,
                       ratio=out.ratio_mean * share,
                       entropy=entropy[mask].mean().item() * token_share if mask.any() else 0.0)
        return out.loss * scale, metrics

    def consistency(mb: dict, logp: torch.Tensor, check: RouteCheck) -> dict:
        total, top, _ = logp_gap(logp, mb["engine_logp"], mb["sampled"])
        if mb["index"] == 0:
            gap_max[0] = 0.0
        gap_max[0] = max(gap_max[0], top)
        parts = mb["scale"]
        scale = parts * ranks.size
        last = mb["index"] == int(parts) - 1
        out = {"logp_gap_mean": scale * total / max(mb["batch_sampled"], 1),
               "logp_gap_max": parts * ranks.max(gap_max[0]) if last else 0.0}
        if mb["batch_routes"]:
            out["routing_mismatch"] = scale * check.mismatched / mb["batch_routes"]
        return out

    return loss_fn
