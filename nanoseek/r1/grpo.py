"""`nanoseek grpo --model DIR --task arithmetic|countdown|FILE.jsonl [key=value ...] [--resume]`.

GRPO on the shared training core (REFERENCE §6; the math is in `grpo_loss`). The core sees GRPO as
a batch source plus a loss function:

* `RolloutSource.next_batch` returns micro-batches of scored completions. Every `mu` optimizer
  steps it draws a new rollout batch: `prompts_per_step` training problems x `group_size` samples
  from the current policy (through the inference adapter in `rollout.py`), rewards from the task's
  verifier and `RewardConfig`, group-normalized advantages, and, when needed, pi_old and pi_ref
  log-probabilities. The batch is split into `grad_accum` micro-batches; token weights are
  normalized over the whole batch, so the split does not change the gradient.
* `grpo_loss_fn` recomputes log pi_theta with gradients and applies the clipped objective.

pi_old (the policy that sampled the batch): with mu = 1 every optimizer step sees fresh samples,
pi_old = pi_theta and the ratio is `exp(logp - logp.detach())` (value 1, correct gradient), so no
extra forward is spent. With mu > 1, `old_logprobs=recompute` (default) takes them from a no-grad
forward of the training path right after sampling (ratio exactly 1 at the first inner step), and
`old_logprobs=engine` uses the log-probs the sampler reported (temperature-scaled, the same
quantity, but from the cached decode path, so off by float noise; saves a forward).

The reference model (for the k3 KL term) is a frozen copy of the starting weights, built only when
beta > 0; its log-probs are computed once per rollout batch. beta = 0 skips it entirely.

Logged every step: reward (mean) / reward_std, accuracy, format, response_length, truncated,
pg_loss and kl separately (with mu = 1 and zero-mean advantages the total loss is ~0 by
construction; pg_loss's gradient is not), clip_frac, entropy, groups_kept (dynamic sampling),
gen_tokens_per_s, tokens_per_s; every `sample_every` steps a table of sample completions with their
rewards (printed, and appended to samples.jsonl); every `eval_every` steps greedy accuracy on the
held-out test split.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.errors import UserError
from nanoseek.r1.configs import GRPOConfig
from nanoseek.r1.grpo_loss import (
    group_advantages,
    informative_groups,
    policy_loss,
    sequence_logprobs,
    token_weights,
)
from nanoseek.r1.rollout import Scored, Throughput, rollout, tokenizer_files
from nanoseek.r1.tasks import Task
from nanoseek.train.core import Trainer, seed_everything


# ================================================================== rollout batches


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

    def micro(self, index: int, parts: int) -> dict:
        rows = torch.tensor_split(torch.arange(self.input_ids.shape[0]), parts)[index]

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        counted = self.weights > 0
        return {"input_ids": pick(self.input_ids), "attention_mask": pick(self.attention_mask),
                "weights": pick(self.weights), "advantages": pick(self.advantages),
                "old_logp": pick(self.old_logp), "ref_logp": pick(self.ref_logp),
                "scale": float(parts), "stats": self.stats,
                "batch_tokens": int(counted.sum()), "batch_seqs": int(counted.any(1).sum())}


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


def rollout_stats(groups: list[list[Scored]], seconds: float) -> dict[str, float]:
    """Reward and completion statistics over every sampled completion (before any filtering)."""
    flat = [s for g in groups for s in g]
    total = torch.tensor([s.rewards["total"] for s in flat])
    lengths = [len(s.completion.tokens) for s in flat]
    n = len(flat)
    return {
        "reward": total.mean().item(),
        "reward_std": total.std().item() if n > 1 else 0.0,
        "accuracy": sum(s.sample.correct for s in flat) / n,
        "format": sum(s.sample.well_formed for s in flat) / n,
        "response_length": sum(lengths) / n,
        "truncated": sum(s.completion.truncated for s in flat) / n,
        "gen_tokens_per_s": sum(lengths) / max(seconds, 1e-9),
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

    State for exact resume: the number of rollout batches drawn (which fixes every sampling seed),
    the prompt cursor, and the current batch with the position inside it."""

    def __init__(self, cfg: GRPOConfig, trainer: Trainer, tokenizer, task: Task,
                 ref_model=None):
        self.cfg, self.trainer, self.tok, self.task = cfg, trainer, tokenizer, task
        self.ref = ref_model
        self.reward_cfg = cfg.reward_config()
        if not task.train:
            raise UserError(f"task {task.name!r} has no training problems")
        self.rollouts = 0  # rollout batches drawn so far
        self.cursor = 0  # training prompts consumed (endless, reshuffled every epoch)
        self.pos = 0  # micro-batches served from `batch`
        self.batch: RolloutBatch | None = None
        self._epoch, self._perm = -1, []  # cached prompt order of the current epoch
        self._started: float | None = None  # for time_limit_min

    # -------------------------------------------------------------- the core's interface
    def next_batch(self) -> dict:
        cfg = self.cfg
        if self.batch is None or self.pos >= cfg.mu * cfg.grad_accum:
            self.batch, self.pos = self.new_batch(), 0
        micro_index = self.pos % cfg.grad_accum
        if micro_index == 0:  # the core reads tokens_per_step after the step: count real tokens
            self.trainer.tokens_per_step = int(self.batch.attention_mask.sum())
            self.check_time_limit()
        self.pos += 1
        return self.batch.micro(micro_index, cfg.grad_accum)

    def check_time_limit(self) -> None:
        """With `time_limit_min`, make the current step the last one once the budget is spent; the
        core then evaluates, checkpoints and exports as at a normal end."""
        if not self.cfg.time_limit_min:
            return
        clock = time.process_time if self.cfg.time_limit_cpu else time.perf_counter
        if self._started is None:
            self._started = clock()
        if clock() - self._started > 60 * self.cfg.time_limit_min:
            self.trainer.cfg.max_steps = min(self.trainer.cfg.max_steps, self.trainer.step + 1)

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts, "cursor": self.cursor, "pos": self.pos,
                "batch": self.batch, "signature": self.signature()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("signature") != self.signature():
            raise UserError("cannot resume GRPO: the task or rollout settings changed since the "
                            f"checkpoint ({state.get('signature')} vs {self.signature()})")
        self.rollouts, self.cursor, self.pos = state["rollouts"], state["cursor"], state["pos"]
        self.batch = state["batch"]

    def signature(self) -> dict:
        c = self.cfg
        return {"task": c.task, "difficulty": c.difficulty, "task_seed": c.task_seed,
                "n_train": len(self.task.train), "group_size": c.group_size,
                "prompts_per_step": c.prompts_per_step, "mu": c.mu, "grad_accum": c.grad_accum}

    # -------------------------------------------------------------- drawing a batch
    def next_problems(self, n: int) -> list:
        """The next n training problems of a seeded order that is reshuffled every epoch."""
        train = self.task.train
        out = []
        for _ in range(n):
            epoch, i = divmod(self.cursor, len(train))
            out.append(train[self._order(epoch)[i]])
            self.cursor += 1
        return out

    def _order(self, epoch: int) -> list[int]:
        if self._epoch != epoch:
            self._perm = list(range(len(self.task.train)))
            random.Random(f"grpo-prompts:{self.cfg.seed}:{epoch}").shuffle(self._perm)
            self._epoch = epoch
        return self._perm

    def sample_groups(self, round_: int) -> list[list[Scored]]:
        cfg = self.cfg
        seed = random.Random(f"grpo-sample:{cfg.seed}:{self.rollouts}:{round_}").getrandbits(40)
        return rollout(self.trainer.model, self.tok, self.task,
                       self.next_problems(cfg.prompts_per_step), n=cfg.group_size,
                       template=cfg.template, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                       reward_cfg=self.reward_cfg, batch_size=cfg.rollout_batch_size)

    def new_batch(self) -> RolloutBatch:
        """Sample, score, (dynamic sampling: keep informative groups, resample to refill), then
        advantages, weights and the pi_old / pi_ref log-probs."""
        cfg = self.cfg
        G = cfg.group_size
        every: list[list[Scored]] = []
        kept: list[list[Scored]] = []
        with Throughput() as timer:
            for round_ in range(1 + (cfg.max_resample if cfg.uses_dynamic_sampling else 0)):
                groups = self.sample_groups(round_)
                every += groups
                if cfg.uses_dynamic_sampling:
                    rewards = torch.tensor([[s.rewards["total"] for s in g] for g in groups])
                    keep = informative_groups(rewards.view(-1), G).tolist()
                    kept += [g for g, k in zip(groups, keep) if k]
                else:
                    kept += groups
                if len(kept) >= cfg.prompts_per_step:
                    break
        self.rollouts += 1
        stats = rollout_stats(every, timer.seconds)
        stats["groups_kept"] = min(len(kept), cfg.prompts_per_step) / cfg.prompts_per_step
        stats["rollout_s"] = timer.seconds
        stats["verifier_failures"] = self.task.stats.errors + self.task.stats.timeouts
        if not kept:  # nothing informative: train on the last groups (zero advantage, KL only)
            kept = groups
        kept = kept[:cfg.prompts_per_step]
        return self.tensorize(kept, stats, sample_rows(every, cfg.show_samples))

    def tensorize(self, groups: list[list[Scored]], stats: dict, samples: list) -> RolloutBatch:
        cfg = self.cfg
        prompt_ids = [self.tok.encode(g[0].prompt) for g in groups]
        ids, attn, comp = batch_tensors(groups, prompt_ids, self.tok.pad_id, cfg.mask_truncated)
        rewards = torch.tensor([s.rewards["total"] for g in groups for s in g])
        adv = group_advantages(rewards, cfg.group_size, scale_std=cfg.loss != "dr_grpo")
        weights = token_weights(comp, cfg.loss, cfg.max_new_tokens)
        old = self.old_logprobs(groups, ids, attn, comp) if cfg.mu > 1 else None
        ref = self.logprobs_of(self.ref, ids, attn) if self.ref is not None else None
        return RolloutBatch(ids, attn, weights, adv, old, ref, stats, samples)

    def old_logprobs(self, groups, ids, attn, comp) -> torch.Tensor:
        if self.cfg.old_logprobs == "recompute":
            return self.logprobs_of(self.trainer.model, ids, attn)
        old = torch.zeros(ids.shape)
        rows = [s.completion for g in groups for s in g]
        for i, c in enumerate(rows):
            start = int(attn[i].sum()) - len(c.tokens)
            old[i, start:start + len(c.tokens)] = torch.tensor(c.logprobs)
        return old

    @torch.no_grad()
    def logprobs_of(self, model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Token log-probs under `model` (no grad, eval mode), computed micro-batch by
        micro-batch with the same split the loss uses, so shapes (and float rounding) match."""
        was = model.training
        model.eval()
        device = self.trainer.device
        parts = []
        for rows in torch.tensor_split(torch.arange(ids.shape[0]), self.cfg.grad_accum):
            logits = model(ids[rows].to(device), attention_mask=attn[rows].to(device)).logits
            parts.append(sequence_logprobs(logits, ids[rows].to(device),
                                           self.cfg.temperature)[0].cpu())
        model.train(was)
        return torch.cat(parts)


# ================================================================== loss


def grpo_loss_fn(cfg: GRPOConfig):
    """loss_fn(model, micro_batch) for the core: the clipped objective on one micro-batch.

    The core averages metrics over the `grad_accum` micro-batches, so every metric is reported
    pre-scaled to make that average the whole batch's value: sums (loss, pg_loss, kl) times the
    number of micro-batches, means (clip_frac, ratio, entropy) times this micro-batch's share of
    the batch's tokens (gspo: sequences) times that number. A micro-batch with nothing to learn
    (all truncated and masked) then contributes exactly zero."""
    eps_low, eps_high = cfg.clip_range

    def loss_fn(model, mb: dict):
        device = next(model.parameters()).device
        ids = mb["input_ids"].to(device)
        weights = mb["weights"].to(device)
        mask = weights > 0
        metrics = dict(mb["stats"])
        if not mask.any():  # nothing to learn in this micro-batch
            metrics.update(loss=0.0, pg_loss=0.0, kl=0.0, clip_frac=0.0, ratio=0.0, entropy=0.0)
            return torch.zeros((), device=device, requires_grad=True), metrics
        logits = model(ids, attention_mask=mb["attention_mask"].to(device)).logits
        logp, entropy = sequence_logprobs(logits, ids, cfg.temperature)
        old = mb["old_logp"].to(device) if mb["old_logp"] is not None else logp.detach()
        ref = mb["ref_logp"].to(device) if mb["ref_logp"] is not None else None
        out = policy_loss(logp, old, mb["advantages"].to(device), weights, variant=cfg.loss,
                          eps_low=eps_low, eps_high=eps_high, beta=cfg.beta, ref_logp=ref)
        scale = mb["scale"]  # weights are normalized over the whole batch; the core divides by it
        token_share = scale * int(mask.sum()) / mb["batch_tokens"]
        share = scale * int(mask.any(1).sum()) / mb["batch_seqs"] if cfg.loss == "gspo" \
            else token_share
        metrics.update(loss=out.loss.item() * scale, pg_loss=out.pg_loss.item() * scale,
                       kl=out.kl.item() * scale, clip_frac=out.clip_frac * share,
                       ratio=out.ratio_mean * share,
                       entropy=entropy[mask].mean().item() * token_share)
        return out.loss * scale, metrics

    return loss_fn


# ================================================================== running


def build_reference(model, beta: float):
    """Frozen copy of the starting policy for the KL term; None when beta = 0 (not even built)."""
    if beta <= 0:
        return None
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def run_grpo(cfg: GRPOConfig, resume: bool = False) -> Trainer:
    """GRPO from `cfg.init_from` on `cfg.task`; returns the Trainer (history; the trained model is
    exported to out_dir/model)."""
    from nanoseek.r1.rollout import render_prompt
    from nanoseek.r1.sft import resolve_tokenizer_dir
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.pretrain import build_model, train_flops_per_token

    if not cfg.init_from:
        raise UserError("GRPO needs a starting model: --model DIR (init_from=DIR)")
    cfg = dataclasses.replace(cfg)  # time_limit_min may shorten max_steps: not the caller's copy
    if not Path(cfg.init_from).is_dir():
        raise UserError(f"model directory {cfg.init_from} does not exist")
    seed_everything(cfg.seed)
    task = cfg.make_task()
    tok_dir = resolve_tokenizer_dir(cfg)
    tokenizer = load_tokenizer(tok_dir)
    # seq_len is not a GRPO setting: sequences are prompt + max_new_tokens, checked at generation
    model = build_model(dataclasses.replace(cfg, seq_len=2), tokenizer.vocab_size)
    context = cfg.max_new_tokens + max(len(tokenizer.encode(render_prompt(p, cfg.template,
                                                                          tokenizer)))
                                       for p in task.train[:50])
    trainer = Trainer(cfg, model, train_flops_per_token(model.config, context),
                      cfg.prompts_per_step * cfg.group_size * context,
                      extra_files=tokenizer_files(tok_dir))
    ref = build_reference(model, cfg.beta)
    if ref is not None:
        ref.to(trainer.device)
    source = RolloutSource(cfg, trainer, tokenizer, task, ref)

    def evaluate() -> dict:
        return greedy_eval(trainer.model, tokenizer, task, cfg)

    def sample() -> dict:
        return write_samples(trainer, source)

    trainer.fit(source, grpo_loss_fn(cfg), evaluate=evaluate if cfg.eval_every else None,
                sample=sample, resume=resume)
    return trainer


def greedy_eval(model, tokenizer, task: Task, cfg: GRPOConfig) -> dict:
    """Held-out greedy accuracy on the first `eval_problems` test problems."""
    from nanoseek.r1.evaluate import evaluate_model

    if not task.test or cfg.eval_problems <= 0:
        return {}
    r = evaluate_model(model, tokenizer, task, k=0, template=cfg.template,
                       max_new_tokens=cfg.max_new_tokens, n_problems=cfg.eval_problems,
                       batch_size=cfg.rollout_batch_size)
    return {"test_accuracy": r.greedy_accuracy, "test_format": r.format_rate,
            "test_response_length": r.mean_response_length}


def write_samples(trainer: Trainer, source: RolloutSource) -> dict:
    """Append the current batch's sample completions to samples.jsonl and print them as a table."""
    batch = source.batch
    if batch is None or not batch.samples:
        return {}
    path = trainer.out_dir / "samples.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        for row in batch.samples:
            f.write(json.dumps({"step": trainer.step, **row}) + "\n")
    if os.environ.get("NANOSEEK_NO_PROGRESS") != "1":
        from rich.console import Console

        Console(stderr=True).print(samples_table(batch.samples, trainer.step))
    return {}


def samples_table(rows: list[dict], step: int):
    from rich.table import Table

    table = Table(title=f"GRPO samples, step {step}", show_lines=True)
    for name in ("prompt", "completion", "reward", "acc", "fmt", "tokens"):
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(_clip(r["prompt"], 40), _clip(r["completion"], 100), f"{r['reward']:.2f}",
                      f"{r['accuracy']:.0f}", f"{r['format']:.0f}",
                      f"{r['tokens']}{'+' if r['finish_reason'] == 'length' else ''}")
    return table


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="starting model directory (HF format with tokenizer.json)")
    p.add_argument("--task", help="arithmetic | countdown | FILE.jsonl of {prompt, answer} lines")
    p.add_argument("--config", help="TOML file with GRPO settings")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. group_size=8 loss=dapo beta=0 mu=2 max_steps=200 "
                        "task_options='{\"max_value\": 20}'")


def run(args: argparse.Namespace) -> int:
    from nanoseek.r1.sft import config_from_args

    cfg = config_from_args(GRPOConfig, args, [f"task={args.task}"] if args.task else [])
    trainer = run_grpo(cfg, resume=args.resume)
    last = trainer.history[-1] if trainer.history else {}
    summary = ", ".join(f"{k}={last[k]:.4g}" for k in
                        ("reward", "accuracy", "test_accuracy", "response_length", "kl")
                        if isinstance(last.get(k), (int, float)))
    print(f"done: step {trainer.step}; {summary}")
    print(f"model: {trainer.out_dir / 'model'}")
    return 0
