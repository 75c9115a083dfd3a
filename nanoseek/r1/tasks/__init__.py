"""Verifiable tasks for R1-style RL, and the prompt templates that present them.

A `Task` is a train split, a test split and a verifier. Built-in generated tasks (`arithmetic`,
`countdown`, `chain_sum`) are produced from a seed with disjoint splits: the test set is drawn first from its own
random stream, so it depends only on (seed, n_test, difficulty) and stays fixed while n_train
varies, and training problems identical to a test problem are never generated. A `jsonl` task reads
{"prompt", "answer"} lines and checks answers with `math_verify`; any task can use a user verifier
given as "package.module:function".

One module per job: `problem` (Problem, Task), `templates` (prompt templates), `generated` (seeded
splits and random expressions), `arithmetic`, `countdown`, `chain_sum`, `jsonl_task`, and `registry` (get_task,
user verifiers). Everything is importable from here.
"""

from nanoseek.r1.tasks.arithmetic import arithmetic_task, verify_arithmetic
from nanoseek.r1.tasks.chain_sum import chain_problem, chain_sum_task
from nanoseek.r1.tasks.countdown import countdown_task, verify_countdown
from nanoseek.r1.tasks.jsonl_task import jsonl_task, load_jsonl_problems, verify_math
from nanoseek.r1.tasks.problem import Problem, Task, Verifier, normalize_text
from nanoseek.r1.tasks.registry import TASKS, get_task, load_verifier
from nanoseek.r1.tasks.templates import (
    FORMAT_INSTRUCTION,
    R1_ZERO_TEMPLATE,
    TEMPLATES,
    chat_messages,
    chat_prompt,
    compact_prompt,
    format_prompt,
    prompt_opens_think,
    r1_zero_prompt,
)

__all__ = [
    "FORMAT_INSTRUCTION", "R1_ZERO_TEMPLATE", "TASKS", "TEMPLATES", "Problem", "Task", "Verifier",
    "arithmetic_task", "chain_problem", "chain_sum_task", "chat_messages", "chat_prompt", "compact_prompt", "countdown_task", "format_prompt",
    "get_task", "jsonl_task", "load_jsonl_problems", "load_verifier", "normalize_text",
    "prompt_opens_think", "r1_zero_prompt", "verify_arithmetic", "verify_countdown", "verify_math",
]
