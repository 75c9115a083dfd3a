"""GRPO's batch source for the training core: rollout batches drawn from the live policy.

Every `mu` optimizer steps `RolloutSource` draws a new rollout batch: `prompts_per_step` training
problems x `group_size` samples from the current policy (through `rollout.py`), rewards from the
task's verifier and `RewardConfig`, group-normalized advantages, and, when needed, pi_old and pi_ref
log-probabilities. The batch is split into `grad_accum` micro-batches; token weights are normalized
over the whole batch, so the split does not change the gradient.

On several data-parallel ranks (nanoseek.r1.grpo_ranks) each rank draws `prompts_per_step / ranks`
of the step's prompts (its slice of the same seeded order) and samples them with seeds of its own;
the weights' normalisers, the token counts and the logged statistics are the whole batch's.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from nanoseek.data.shuffle import EpochOrder
from nanoseek.errors import UserError
from nanoseek.r1.configs import GRPOConfig
from nanoseek.r1.consistency import RouteCheck, batch_routes
from nanoseek.r1.grpo_loss import group_advantages, informative_groups, sequence_logprobs, token_weights
from nanoseek.r1.grpo_ranks import DataParallelRanks, RolloutPolicy
from nanoseek.r1.rollout import Scored, Stopwatch, encode_prompt, rollout
from nanoseek.r1.tasks import Task
from nanoseek.train.core import Trainer


@dataclass
class RolloutBatch:
    """A scored rollout batch as tensors, ready to split into micro-batches. Token-aligned [N, T]
    tensors: position t holds token t and (for logp tensors) log p(token t | tokens < t)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    weights: torch.Tensor  # token weights of the loss variant (0 off the completion)
    advantages: torch.Tensor  # [N]
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    stats: dict[str, float]
    samples: list[dict]  # decoded completions for the sample table
    # training-inference consistency (nanoseek.r1.consistency): the sampler's log-probs, which
    # tokens it sampled, and the MoE routing of the rollout pass ([N, layers, T, K], -1 = none)
    engine_logp: torch.Tensor | None = None
    sampled: torch.Tensor | None = None
    routes: torch.Tensor | None = None
    # counts over the whole batch, all data-parallel ranks together (None: this batch's, `local_totals`)
    totals: dict | None = None

    def local_totals(self) -> dict[str, int]:
        return batch_counts(self.attention_mask, self.weights, self.sampled, self.routes)

    def micro(self, index: int, parts: int, measure: bool = False) -> dict:
        """Micro-batch `index` of `parts`. `measure`: log the consistency metrics (first inner
        step only: with mu > 1 later steps differ from the sampler by learning, not by float noise)."""
        rows = torch.tensor_split(torch.arange(self.input_ids.shape[0]), parts)[index]

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        totals = self.totals or self.local_totals()
        measure = measure and self.engine_logp is not None
        return {"input_ids": pick(self.input_ids), "attention_mask": pick(self.attention_mask),
                "weights": pick(self.weights), "advantages": pick(self.advantages),
                "old_logp": pick(self.old_logp), "ref_logp": pick(self.ref_logp),
                "scale": float(parts), "index": index, "stats": self.stats,
                "batch_tokens": totals["counted_tokens"], "batch_seqs": totals["seqs"],
                "routes": pick(self.routes), "measure": measure,
                "engine_logp": pick(self.engine_logp) if measure else None,
                "sampled": pick(self.sampled) if measure else None,
                "batch_sampled": totals["sampled"] if measure else 0,
                "batch_routes": totals["routes"] if measure else 0}


def batch_counts(attention_mask: torch.Tensor, weights: torch.Tensor, sampled: torch.Tensor | None,
                 routes: torch.Tensor | None) -> dict[str, int]:
    """tokens (attention), counted sequences and tokens (weight > 0), sampled tokens, MoE routes."""
    counted = weights > 0
    return {"tokens": int(attention_mask.sum()), "seqs": int(counted.any(1).sum()),
            "counted_tokens": int(counted.sum()), "sampled": int(sampled.sum()) if sampled is not None else 0,
            "routes": int((routes[..., 0] >= 0).sum()) if routes is not None else 0}


def batch_tensors(groups: list[list[Scored]], prompt_ids: list[list[int]], pad_id: int,
                  mask_truncated: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [prompt | completion | pad] ids, attention mask, and the completion mask
    (token-aligned; zero for truncated completions when `mask_truncated`)."""
    rows = [(p, s.completion) for p, g in zip(prompt_ids, groups) for s in g]
    width = max(len(p) + len(c.tokens) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    comp = torch.zeros(len(rows), width)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c.tokens)
        ids[i, :n] = torch.tensor(p + c.tokens)
        attn[i, :n] = 1
        if not (mask_truncated and c.truncated):
            comp[i, len(p):n] = 1
    return ids, attn, comp


def engine_logprobs(completions: list, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's log-probs placed on the right-padded batch ([N, T], token-aligned like
    `sequence_logprobs`), and the bool mask of the sampled tokens."""
    logp = torch.zeros(attn.shape)
    sampled = torch.zeros(attn.shape, dtype=torch.bool)
    for i, c in enumerate(completions):
        end = int(attn[i].sum())
        logp[i, end - len(c.tokens):end] = torch.tensor(c.logprobs)
        sampled[i, end - len(c.tokens):end] = True
    return logp, sampled


def completion_facts(groups: list[list[Scored]], phrase: str = "") -> list[list[tuple]]:
    """Per group, per completion: (reward, correct, well formed, tokens, truncated, contains `phrase`):
    what the statistics need, small enough to gather from every rank."""
    return [[(s.rewards["total"], s.sample.correct, s.sample.well_formed, len(s.completion.tokens),
              s.completion.truncated, bool(phrase) and phrase in s.text) for s in g] for g in groups]


def rollout_stats(groups: list[list[Scored]], seconds: float, phrase: str = "") -> dict[str, float]:
    """Reward and completion statistics over every sampled completion (before any filtering);
    with `phrase`, the share of completions that contain it (`phrase_share`)."""
    return stats_of_facts(completion_facts(groups, phrase), seconds, bool(phrase))


def stats_of_facts(groups: list[list[tuple]], seconds: float, phrase: bool = False) -> dict[str, float]:
    flat = [f for g in groups for f in g]
    total = torch.tensor([f[0] for f in flat])
    lengths = [f[3] for f in flat]
    n = len(flat)
    return {
        "reward": total.mean().item(),
        "reward_std": total.std().item() if n > 1 else 0.0,
        "accuracy": sum(f[1] for f in flat) / n,
        "format": sum(f[2] for f in flat) / n,
        "response_length": sum(lengths) / n,
        "truncated": sum(f[4] for f in flat) / n,
        # groups whose samples all earned the same reward: zero advantage, nothing to learn from
        "zero_var_groups": sum(len({f[0] for f in g}) == 1 for g in groups) / len(groups),
        "gen_tokens_per_s": sum(lengths) / max(seconds, 1e-9),
        **({"phrase_share": sum(f[5] for f in flat) / n} if phrase else {}),
    }


def sample_rows(groups: list[list[Scored]], n: int) -> list[dict]:
    """Up to n completions spread over the batch, for the table and samples.jsonl."""
    flat = [s for g in groups for s in g]
    if not flat or n <= 0:
        return []
    picks = sorted({round(i * (len(flat) - 1) / max(1, n - 1)) for i in range(n)})
    return [{"prompt": flat[i].prompt, "completion": flat[i].text,
             "reward": round(flat[i].rewards["total"], 4),
             "accuracy": flat[i].rewards["accuracy"], "format": flat[i].rewards["format"],
             "tokens": len(flat[i].completion.tokens),
             "finish_reason": flat[i].completion.finish_reason} for i in picks]


class RolloutSource:
    """Batch source for the core: rollout batches from the live policy, reused for `mu` steps.

    State for exact resume, per data-parallel rank: the number of rollout batches drawn (which fixes
    every sampling seed), the prompt cursor, and the current batch with the position inside it.
    `ranks` places this rank among the data-parallel ones; `policy` samples (default: the trained model)."""

    def __init__(self, cfg: GRPOConfig, trainer: Trainer, tokenizer, task: Task,
                 ref_model=None, ranks: DataParallelRanks | None = None, policy: RolloutPolicy | None = None):
        self.cfg, self.trainer, self.tok, self.task = cfg, trainer, tokenizer, task
        self.ref = ref_model
        self.ranks = ranks or DataParallelRanks()
        self.policy = policy or RolloutPolicy(trainer.model)
        self.prompts = cfg.prompts_per_step // self.ranks.size  # this rank's groups (GRPOConfig.validate)
        self.reward_cfg = cfg.reward_config()
        if not task.train:
            raise UserError(f"task {task.name!r} has no training problems")
        self.rollouts = 0  # rollout batches drawn so far
        self.cursor = 0  # training prompts consumed (endless, reshuffled every epoch)
        self.pos = 0  # micro-batches served from `batch`
        self.batch: RolloutBatch | None = None
        self.order = EpochOrder(len(task.train), cfg.seed, stream="grpo-prompts")
        self._started: float | None = None  # for time_limit_min

    # -------------------------------------------------------------- the core's interface
    def next_batch(self) -> dict:
        cfg = self.cfg
        if self.batch is None or self.pos >= cfg.mu * cfg.grad_accum:
            self.batch, self.pos = self.new_batch(), 0
        micro_index = self.pos % cfg.grad_accum
        first_inner_step = self.pos < cfg.grad_accum
        if micro_index == 0:  # the core reads tokens_per_step after the step: count real tokens
            self.trainer.tokens_per_step = (self.batch.totals or self.batch.local_totals())["tokens"]
            self.check_time_limit()
        self.pos += 1
        return self.batch.micro(micro_index, cfg.grad_accum, measure=first_inner_step)

    def check_time_limit(self) -> None:
        """With `time_limit_min`, make the current step the last one once the budget is spent; the
        core then evaluates, checkpoints and exports as at a normal end."""
        if not self.cfg.time_limit_min:
            return
        clock = time.process_time if self.cfg.time_limit_cpu else time.perf_counter
        if self._started is None:
            self._started = clock()
        if self.ranks.any(clock() - self._started > 60 * self.cfg.time_limit_min):  # all ranks stop together
            self.trainer.cfg.max_steps = min(self.trainer.cfg.max_steps, self.trainer.step + 1)

    def state_dict(self) -> dict:
        """Every rank's position and current batch (gathered: the checkpoint's trainer state is written
        by rank 0), in rank order."""
        mine = {"rollouts": self.rollouts, "cursor": self.cursor, "pos": self.pos,
                "batch": None if self.batch is None else dict(vars(self.batch))}  # plain values: no pickle
        return {"ranks": self.ranks.gather(mine), "signature": self.signature()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("signature") != self.signature():
            raise UserError("cannot resume GRPO: the task or rollout settings changed since the "
                            f"checkpoint ({state.get('signature')} vs {self.signature()})")
        every = state["ranks"]
        if len(every) != self.ranks.size:
            raise UserError(f"cannot resume GRPO: the checkpoint holds the rollout streams of {len(every)} "
                            f"data-parallel rank(s), this run has {self.ranks.size}; resume with the same "
                            "parallel.dp_shard x parallel.ep (the weights reshard, the rollout streams do not)")
        mine = every[self.ranks.rank]
        self.rollouts, self.cursor, self.pos = mine["rollouts"], mine["cursor"], mine["pos"]
        self.batch = None if mine["batch"] is None else RolloutBatch(**mine["batch"])

    def signature(self) -> dict:
        c = self.cfg
        return {"task": c.task, "difficulty": c.difficulty, "task_seed": c.task_seed,
                "n_train": len(self.task.train), "group_size": c.group_size,
                "prompts_per_step": c.prompts_per_step, "mu": c.mu, "grad_accum": c.grad_accum}

    # -------------------------------------------------------------- drawing a batch
    def next_problems(self) -> list:
        """This rank's slice of the next `prompts_per_step` training problems of a seeded order that is
        reshuffled every epoch (one process: all of them)."""
        start = self.cursor + self.ranks.rank * self.prompts
        self.cursor += self.cfg.prompts_per_step
        return [self.task.train[self.order[start + i]] for i in range(self.prompts)]

    def sample_groups(self, round_: int) -> list[list[Scored]]:
        cfg = self.cfg
        rank = f":{self.ranks.rank}" if self.ranks.rank else ""  # rank 0 keeps the one-process seeds
        seed = random.Random(f"grpo-sample:{cfg.seed}:{self.rollouts}:{round_}{rank}").getrandbits(40)
        return rollout(self.policy.model, self.tok, self.task,
                       self.next_problems(), n=cfg.group_size,
                       template=cfg.template, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                       reward_cfg=self.reward_cfg, batch_size=cfg.rollout_batch_size,
                       record_routes=True)

    def new_batch(self) -> RolloutBatch:
        """Sample, score, (dynamic sampling: keep informative groups, resample to refill), then
        advantages, weights and the pi_old / pi_ref log-probs."""
        cfg = self.cfg
        G = cfg.group_size
        every: list[list[Scored]] = []
        kept: list[list[Scored]] = []
        self.policy.refresh()
        with Stopwatch() as timer:
            for round_ in range(1 + (cfg.max_resample if cfg.uses_dynamic_sampling else 0)):
                groups = self.sample_groups(round_)
                every += groups
                if cfg.uses_dynamic_sampling:
                    rewards = torch.tensor([[s.rewards["total"] for s in g] for g in groups])
                    keep = informative_groups(rewards.view(-1), G).tolist()
                    kept += [g for g, k in zip(groups, keep) if k]
                else:
                    kept += groups
                if len(kept) >= self.prompts:
                    break
        self.rollouts += 1
        stats = self.global_stats(every, min(len(kept), self.prompts), timer.seconds)
        if not kept:  # nothing informative: train on the last groups (zero advantage, KL only)
            kept = groups
        kept = kept[:self.prompts]
        return self.tensorize(kept, stats, sample_rows(every, cfg.show_samples))

    def global_stats(self, every: list[list[Scored]], kept: int, seconds: float) -> dict[str, float]:
        """The rollout statistics of all ranks' completions together (the same on every rank); the ranks
        sample at the same time, so the rollout takes the slowest rank's seconds."""
        cfg = self.cfg
        mine = (completion_facts(every, cfg.track_phrase), kept, seconds,
                self.task.stats.errors + self.task.stats.timeouts)
        ranks = self.ranks.gather(mine)
        seconds = max(r[2] for r in ranks)
        stats = stats_of_facts([g for r in ranks for g in r[0]], seconds, bool(cfg.track_phrase))
        stats["groups_kept"] = sum(r[1] for r in ranks) / cfg.prompts_per_step
        stats["rollout_s"] = seconds
        stats["verifier_failures"] = sum(r[3] for r in ranks)
        return stats

    def tensorize(self, groups: list[list[Scored]], stats: dict, samples: list) -> RolloutBatch:
        cfg = self.cfg
        prompt_ids = [encode_prompt(g[0].problem, cfg.template, self.tok) for g in groups]
        ids, attn, comp = batch_tensors(groups, prompt_ids, self.tok.pad_id, cfg.mask_truncated)
        rewards = torch.tensor([s.rewards["total"] for g in groups for s in g])
        adv = group_advantages(rewards, cfg.group_size, scale_std=cfg.loss != "dr_grpo")
        completions = [s.completion for g in groups for s in g]
        engine, sampled = engine_logprobs(completions, attn)
        routes = batch_routes([(len(p), s.completion.routes) for p, g in zip(prompt_ids, groups)
                               for s in g], ids.shape[1])
        # the whole batch's counts (every rank's rows): the loss normalisers and the logged shares
        local = batch_counts(attn, comp, sampled, routes)
        totals = dict(zip(local, map(int, self.ranks.sum(list(local.values())))))
        weights = token_weights(comp, cfg.loss, cfg.max_new_tokens,
                                totals=(totals["seqs"], totals["counted_tokens"]))
        if cfg.mu > 1:
            old = (engine.clone() if cfg.old_logprobs == "engine"  # a tensor of its own: checkpoints
                   else self.logprobs_of(self.trainer.model, ids, attn, routes))
        else:
            old = None
        ref = self.logprobs_of(self.ref, ids, attn) if self.ref is not None else None
        return RolloutBatch(ids, attn, weights, adv, old, ref, stats, samples, engine, sampled, routes, totals)

    @torch.no_grad()
    def logprobs_of(self, model, ids: torch.Tensor, attn: torch.Tensor,
                    routes: torch.Tensor | None = None) -> torch.Tensor:
        """Token log-probs under `model` (no grad, eval mode), computed micro-batch by
        micro-batch with the same split the loss uses, so shapes (and float rounding) match.
        With `replay_routing`, `routes` (the rollout's) replace the model's own routing."""
        was = model.training
        model.eval()
        device = self.trainer.device
        parts = []
        for rows in torch.tensor_split(torch.arange(ids.shape[0]), self.cfg.grad_accum):
            replay = RouteCheck(routes[rows] if routes is not None and self.cfg.replay_routing else None,
                                replay=True)
            with replay.on(model):
                logits = model(ids[rows].to(device), attention_mask=attn[rows].to(device)).logits
            parts.append(sequence_logprobs(logits, ids[rows].to(device),
                                           self.cfg.temperature)[0].cpu())
        model.train(was)
        return torch.cat(parts)
