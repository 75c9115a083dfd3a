"""The R1 recipes' settings, each the shared training part plus its own (see nanoseek.train.config):
SFT and distillation = LanguageModelingConfig (data, seq_len, batch_size, MTP weight) + data settings;
GRPO = TrainerConfig + task, rollout and objective settings (no data, seq_len or YaRN: sequences are a
prompt plus up to max_new_tokens)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nanoseek.errors import require
from nanoseek.r1.grpo_loss import DEFAULT_EPS, LOSS_VARIANTS
from nanoseek.r1.rewards import RewardConfig
from nanoseek.r1.rollout import build_task
from nanoseek.r1.tasks import TEMPLATES, Task
from nanoseek.train.config import LanguageModelingConfig, TrainerConfig

SFT_TEMPLATES = ("none", "r1_zero", "compact", "chat")


def require_data_parallel_only(cfg: TrainerConfig) -> None:
    """SFT and GRPO split their batches over data-parallel ranks (dp_shard x ep); no pipeline stages."""
    require(cfg.parallel.pp == 1, "parallel.pp", cfg.parallel.pp,
            "1: SFT and GRPO train with data parallelism only (parallel.dp_shard, parallel.ep)")


@dataclass
class SFTConfig(LanguageModelingConfig):
    """LanguageModelingConfig plus the SFT data settings. `model`/`init_from` name the model directory to
    fine-tune (`--model` sets both); `data` is the JSONL file."""

    data: str = ""
    out_dir: str = "runs/sft"
    template: str = "none"  # how a "prompt" is rendered: none (as is) | r1_zero | compact | chat
    tokenizer: str = ""  # tokenizer directory; default: the model directory
    val_fraction: float = 0.0  # share of examples held out for val_loss
    epochs: int = 0  # > 0: sets max_steps to this many passes over the data
    pack: bool = True  # several examples per sequence (isolated by the attention mask)
    too_long: str = "error"  # an example longer than seq_len: error | skip
    lr: float = 5e-4
    warmup_steps: int = 10
    schedule: str = "cosine"
    max_steps: int = 200
    eval_every: int = 50
    save_every: int = 100

    def checks(self) -> list[tuple[bool, str, str]]:
        return super().checks() + [
            (self.template in SFT_TEMPLATES, "template", ", ".join(SFT_TEMPLATES)),
            (self.too_long in ("error", "skip"), "too_long", "error or skip"),
            (math.isfinite(self.val_fraction) and 0.0 <= self.val_fraction < 1.0, "val_fraction", "in [0, 1)"),
            (self.epochs >= 0, "epochs", ">= 0 (0 = use max_steps)"),
        ]

    def validate(self) -> None:
        super().validate()
        require_data_parallel_only(self)


@dataclass
class GRPOConfig(TrainerConfig):
    """TrainerConfig plus task, rollout and objective settings (`--model` sets model/init_from)."""

    out_dir: str = "runs/grpo"
    # task
    task: str = "arithmetic"  # arithmetic | countdown | chain_sum | path to a .jsonl of {prompt, answer}
    difficulty: int = 0  # 0 = the task's default
    task_seed: int = 0  # seed of the train/test split (keep it equal to eval's)
    n_train: int = 1000
    n_test: int = 200
    task_options: dict = field(default_factory=dict)  # e.g. {"max_value": 20}
    verifier: str = ""  # "package.module:function" replaces the task's checker
    verifier_timeout: float = 1.0
    template: str = "compact"  # r1_zero | compact | chat
    # rollouts
    group_size: int = 8  # G completions per prompt
    prompts_per_step: int = 8  # prompts per rollout batch
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    rollout_batch_size: int = 64  # sequences per generation call
    rewards: str = "r1_zero"  # preset (r1_zero, r1, tinyzero, dapo, accuracy) or "accuracy=1,format=0.1"
    overlong_buffer: int = -1  # -1: a fifth of max_new_tokens
    language: str = "latin"  # target script of the language reward
    # objective
    loss: str = "grpo"  # grpo | dr_grpo | dapo | gspo
    beta: float = 0.001  # KL weight (R1: 0.001); 0 = no reference model
    eps_low: float = 0.0  # 0 = the variant's default (0.2; gspo 3e-4)
    eps_high: float = 0.0  # 0 = the variant's default (eps_low; dapo 0.28; gspo 4e-4)
    mu: int = 1  # optimizer steps per rollout batch
    old_logprobs: str = "recompute"  # pi_old when mu > 1: recompute | engine
    dynamic_sampling: bool = False  # drop groups with all-equal rewards (always on for dapo)
    max_resample: int = 3  # extra sampling rounds to refill dropped groups
    mask_truncated: bool = False  # completions cut at max_new_tokens get no loss
    replay_routing: bool = False  # MoE: the training forward uses the experts the rollout chose
    track_phrase: str = ""  # logs phrase_share: share of completions containing it (e.g. "wait", a self-check)
    # optimizer defaults suited to RL on a pretrained policy
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_steps: int = 100
    # bookkeeping
    eval_every: int = 25
    eval_problems: int = 100  # greedy accuracy on the first N test problems
    sample_every: int = 10
    show_samples: int = 4  # rows of the sample table (0 = no table)
    save_every: int = 50
    time_limit_min: float = 0.0  # > 0: end the run (eval, checkpoint, export) after this many minutes
    time_limit_cpu: bool = False  # measure that limit in process CPU time instead of wall time

    def checks(self) -> list[tuple[bool, str, str]]:
        return super().checks() + [
            (self.loss in LOSS_VARIANTS, "loss", " | ".join(LOSS_VARIANTS)),
            (self.group_size >= 2, "group_size", ">= 2 (advantages compare samples of a prompt)"),
            (self.prompts_per_step >= 1, "prompts_per_step", ">= 1"),
            (self.mu >= 1, "mu", ">= 1"),
            (self.old_logprobs in ("recompute", "engine"), "old_logprobs", "recompute or engine"),
            (self.template in TEMPLATES, "template", " | ".join(TEMPLATES)),
            (math.isfinite(self.temperature) and self.temperature > 0, "temperature",
             "a finite number > 0 (GRPO needs diverse samples)"),
            (math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (math.isfinite(self.beta) and self.beta >= 0, "beta", "a finite number >= 0"),
            (self.max_new_tokens >= 1, "max_new_tokens", ">= 1"),
            (math.isfinite(self.eps_low) and self.eps_low >= 0, "eps_low", "a finite number >= 0"),
            (math.isfinite(self.eps_high) and self.eps_high >= 0, "eps_high", "a finite number >= 0"),
            (self.prompts_per_step * self.group_size >= self.grad_accum, "grad_accum",
             "<= prompts_per_step * group_size"),
            (self.rollout_batch_size >= 1, "rollout_batch_size", ">= 1"),
            (self.n_train >= 1, "n_train", ">= 1"),
            (self.n_test >= 0, "n_test", ">= 0"),
            (self.max_resample >= 0, "max_resample", ">= 0"),
            (self.eval_problems >= 0, "eval_problems", ">= 0"),
            (self.sample_every >= 0, "sample_every", ">= 0 (0 = only at the end)"),
            (self.show_samples >= 0, "show_samples", ">= 0"),
            (math.isfinite(self.verifier_timeout) and self.verifier_timeout > 0, "verifier_timeout",
             "a finite number > 0"),
            (math.isfinite(self.time_limit_min) and self.time_limit_min >= 0, "time_limit_min",
             ">= 0 (0 = no limit)"),
        ]

    def validate(self) -> None:
        super().validate()
        require_data_parallel_only(self)
        dp = self.parallel.data_parallel
        require(self.prompts_per_step % dp == 0, "prompts_per_step", self.prompts_per_step,
                f"a multiple of the data-parallel ranks ({dp} = parallel.dp_shard x parallel.ep): each rank "
                "rolls out whole groups of its own prompts")
        require(self.prompts_per_step // dp * self.group_size >= self.grad_accum, "grad_accum", self.grad_accum,
                f"<= the sequences of one data-parallel rank ({self.prompts_per_step // dp} prompts x "
                f"{self.group_size})")

    @property
    def clip_range(self) -> tuple[float, float]:
        """(eps_low, eps_high): 0 in the config means the variant's default; a user eps_low with
        no eps_high makes the range symmetric, except for dapo and gspo (clip-higher)."""
        low_default, high_default = DEFAULT_EPS[self.loss]
        low = self.eps_low or low_default
        high = self.eps_high or (high_default if self.loss in ("dapo", "gspo") else low)
        return low, high

    @property
    def uses_dynamic_sampling(self) -> bool:
        return self.dynamic_sampling or self.loss == "dapo"

    def reward_config(self) -> RewardConfig:
        buffer = None if self.overlong_buffer < 0 else self.overlong_buffer
        return RewardConfig.parse(self.rewards, overlong_buffer=buffer, language=self.language)

    def make_task(self) -> Task:
        return build_task(self.task, seed=self.task_seed, n_train=self.n_train,
                          n_test=self.n_test, difficulty=self.difficulty,
                          options=self.task_options, verifier=self.verifier,
                          timeout_s=self.verifier_timeout)


@dataclass
class DistillConfig(SFTConfig):
    """SFTConfig whose `model` is the student spec (preset, config.json or model directory)."""

    out_dir: str = "runs/distill"
    model: str = "tiny"
