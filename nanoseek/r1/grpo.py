"""`nanoseek grpo --model DIR --task arithmetic|countdown|FILE.jsonl [key=value ...] [--resume]`.

GRPO on the shared training core (DeepSeekMath §4.1 and DeepSeek-R1 §2.2.1; the design is in
docs/design.md). The core sees GRPO as a batch source plus a loss function, one module each:

* `grpo_batches.RolloutSource` draws rollout batches from the live policy (samples, rewards,
  group-normalized advantages, pi_old / pi_ref log-probs) and serves them as micro-batches;
* `grpo_objective.grpo_loss_fn` recomputes log pi_theta with gradients and applies the clipped
  objective, whose math is in `grpo_loss`;
* `grpo_report` holds the held-out greedy evaluation and the sample table.

This module builds the pieces, runs the core, and is the `nanoseek grpo` command.

pi_old (the policy that sampled the batch): with mu = 1 every optimizer step sees fresh samples,
pi_old = pi_theta and the ratio is `exp(logp - logp.detach())` (value 1, correct gradient), so no
extra forward is spent. With mu > 1, `old_logprobs=recompute` (default) takes them from a no-grad
forward of the training path right after sampling (ratio exactly 1 at the first inner step), and
`old_logprobs=engine` uses the log-probs the sampler reported (temperature-scaled, the same
quantity, but from the cached decode path, so off by float noise; saves a forward).

The reference model (for the k3 KL term) is a frozen copy of the starting weights, built only when
beta > 0; its log-probs are computed once per rollout batch. beta = 0 skips it entirely.

Logged every step: reward (mean) / reward_std, accuracy, format, response_length, truncated,
zero_var_groups, the training-inference consistency (logp_gap_mean / logp_gap_max, routing_mismatch;
see consistency.py; `replay_routing=true` replays the rollout's MoE routing), pg_loss and kl separately (with mu = 1 and zero-mean advantages the total loss is ~0 by
construction; pg_loss's gradient is not), clip_frac, entropy, groups_kept (dynamic sampling),
gen_tokens_per_s, tokens_per_s; every `sample_every` steps a table of sample completions with their
rewards (printed, and appended to samples.jsonl); every `eval_every` steps greedy accuracy on the
held-out test split. At the end, `diagnostics.diagnose` gives a one-line verdict per silent failure
(printed, and written to out_dir/diagnostics.json).

Several processes (`torchrun --nproc-per-node N -m nanoseek grpo ... parallel.dp_shard=N`): data
parallelism, each rank rolling out its own whole groups (grpo_ranks.py, docs/distributed.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.device import resolve_device
from nanoseek.errors import UserError
from nanoseek.files import write_json
from nanoseek.hf import model_directory, tokenizer_files
from nanoseek.r1.configs import GRPOConfig
from nanoseek.r1.diagnostics import as_json, diagnose, print_diagnostics
from nanoseek.r1.grpo_batches import RolloutSource
from nanoseek.r1.grpo_objective import grpo_loss_fn
from nanoseek.r1.grpo_ranks import DataParallelRanks, RolloutPolicy
from nanoseek.r1.grpo_report import greedy_eval, write_samples
from nanoseek.r1.rollout import encode_prompt, tokenizer_dir_for
from nanoseek.r1.sft import config_from_args
from nanoseek.parallel.runtime import ParallelRuntime
from nanoseek.train.core import Trainer, print_summary, seed_everything
from nanoseek.train.pretrain import build_model, train_flops_per_token


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
    if not cfg.init_from:
        raise UserError("GRPO needs a starting model: --model DIR (init_from=DIR)")
    cfg = dataclasses.replace(cfg)  # time_limit_min may shorten max_steps: not the caller's copy
    model_directory(cfg.init_from)
    cfg.validate()
    parallel = ParallelRuntime.for_run(cfg.parallel, resolve_device(cfg.device))
    ranks = DataParallelRanks(parallel)
    seed_everything(cfg.seed)  # the same on every rank: identical weights before sharding
    task = cfg.make_task()
    tok_dir = tokenizer_dir_for(cfg)
    tokenizer = load_tokenizer(tok_dir)
    # GRPO has no seq_len: sequences are prompt + max_new_tokens, checked at generation
    model = build_model(cfg, tokenizer.vocab_size)
    # the MTP modules are no part of the policy (GRPO's forward never runs them): frozen, they get no
    # optimizer state, which a sharded checkpoint must hold for every trained weight to load again
    model.mtp.requires_grad_(False)
    context = cfg.max_new_tokens + max(len(encode_prompt(p, cfg.template, tokenizer))
                                       for p in task.train[:50])
    # full local copies, taken before the Trainer shards the model: the frozen reference and, on
    # several processes, the policy that samples (grpo_ranks.RolloutPolicy)
    ref = build_reference(model, cfg.beta)
    sampler = copy.deepcopy(model) if parallel.shards_model else None
    trainer = Trainer(cfg, model, train_flops_per_token(model.config, context),
                      cfg.prompts_per_step * cfg.group_size * context,
                      extra_files=tokenizer_files(tok_dir), parallel=parallel)
    for local in (ref, sampler):
        if local is not None:
            local.to(trainer.device)
    policy = RolloutPolicy(trainer.model, sampler)
    source = RolloutSource(cfg, trainer, tokenizer, task, ref, ranks=ranks, policy=policy)

    def evaluate() -> dict:  # each rank its share of the problems, on its own copy of the policy
        policy.refresh()
        return greedy_eval(policy.model, tokenizer, task, cfg, ranks)

    def sample() -> dict:
        return write_samples(trainer, source) if trainer.main else {}

    trainer.fit(source, grpo_loss_fn(cfg, ranks), evaluate=evaluate if cfg.eval_every else None,
                sample=sample, resume=resume, sample_every=cfg.sample_every)
    # silent failures (truncation, zero-variance groups, flat reward, KL, train/inference mismatch)
    trainer.diagnostics = diagnose(trainer.history, cfg.beta)
    if trainer.main:
        write_json(trainer.out_dir / "diagnostics.json", as_json(trainer.diagnostics))
        print_diagnostics(trainer.diagnostics)
    return trainer


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="starting model directory (HF format with tokenizer.json)")
    p.add_argument("--task", help="arithmetic | countdown | chain_sum | FILE.jsonl of {prompt, answer} lines")
    p.add_argument("--config", help="TOML file with GRPO settings")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. group_size=8 loss=dapo beta=0 mu=2 max_steps=200 "
                        "task_options='{\"max_value\": 20}'")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(GRPOConfig, args, [f"task={args.task}"] if args.task else [])
    trainer = run_grpo(cfg, resume=args.resume)
    if trainer.main:
        print_summary(trainer, ("reward", "accuracy", "test_accuracy", "response_length", "kl"))
    trainer.parallel.close()
    return 0
