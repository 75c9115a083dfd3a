"""DeepSeek-R1's recipe in miniature: verifiable tasks, rule-based rewards, safe verifiers, metrics.

This package's import is torch-free; training loops (GRPO, SFT, sampling) live in submodules and
are re-exported lazily: `from nanoseek.r1 import run_grpo` imports torch only then."""

from nanoseek.r1.eval_metrics import EvalResult, Sample, maj_at_k, majority_vote, pass_at_k
from nanoseek.r1.rewards import (
    REWARD_PRESETS,
    ParsedCompletion,
    RewardConfig,
    accuracy_reward,
    compute_rewards,
    extract_answer,
    format_reward,
    language_consistency,
    language_reward,
    overlong_penalty,
    parse_completion,
)
from nanoseek.r1.tasks import (
    TASKS,
    TEMPLATES,
    Problem,
    Task,
    chat_prompt,
    compact_prompt,
    format_prompt,
    get_task,
    load_jsonl_problems,
    load_verifier,
    prompt_opens_think,
    r1_zero_prompt,
)
from nanoseek.r1.verify import (
    ExprLimits,
    VerifierStats,
    VerifierTimeout,
    check_countdown,
    evaluate_expression,
    parse_expression,
    parse_number,
    run_with_timeout,
)

# name -> submodule, imported on first access (PEP 562), so `import nanoseek.r1` stays torch-free
_LAZY = {
    "SFTConfig": "configs", "run_sft": "sft", "load_sft_examples": "sft",
    "GRPOConfig": "configs", "run_grpo": "grpo",
    "group_advantages": "grpo_loss", "policy_loss": "grpo_loss", "token_weights": "grpo_loss",
    "k3_kl": "grpo_loss",
    "evaluate_model": "evaluate", "sample_traces": "sample",
    "DistillConfig": "configs", "run_distill": "distill",
    "generate_completions": "rollout", "encode_prompt": "rollout",
    "score_completion": "rollout",
    "R1Config": "pipeline", "run_r1": "pipeline", "diagnose": "diagnostics",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"nanoseek.r1.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'nanoseek.r1' has no attribute {name!r}")


__all__ = [*_LAZY,
    "EvalResult", "Sample", "maj_at_k", "majority_vote", "pass_at_k",
    "REWARD_PRESETS", "ParsedCompletion", "RewardConfig", "accuracy_reward", "compute_rewards",
    "extract_answer", "format_reward", "language_consistency", "language_reward",
    "overlong_penalty", "parse_completion",
    "TASKS", "TEMPLATES", "Problem", "Task", "chat_prompt", "compact_prompt", "format_prompt",
    "get_task", "load_jsonl_problems", "load_verifier", "prompt_opens_think", "r1_zero_prompt",
    "ExprLimits", "VerifierStats", "VerifierTimeout", "check_countdown", "evaluate_expression",
    "parse_expression", "parse_number", "run_with_timeout",
]
