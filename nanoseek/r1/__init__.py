"""DeepSeek-R1's recipe in miniature: verifiable tasks, rule-based rewards, safe verifiers, metrics.

This package's import is torch-free; training loops (GRPO, SFT, sampling) live in submodules."""

from nanoseek.r1.metrics import EvalResult, Sample, maj_at_k, majority_vote, pass_at_k
from nanoseek.r1.rewards import (
    PRESETS,
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

__all__ = [
    "EvalResult", "Sample", "maj_at_k", "majority_vote", "pass_at_k",
    "PRESETS", "ParsedCompletion", "RewardConfig", "accuracy_reward", "compute_rewards",
    "extract_answer", "format_reward", "language_consistency", "language_reward",
    "overlong_penalty", "parse_completion",
    "TASKS", "TEMPLATES", "Problem", "Task", "chat_prompt", "compact_prompt", "format_prompt",
    "get_task", "load_jsonl_problems", "load_verifier", "prompt_opens_think", "r1_zero_prompt",
    "ExprLimits", "VerifierStats", "VerifierTimeout", "check_countdown", "evaluate_expression",
    "parse_expression", "parse_number", "run_with_timeout",
]
