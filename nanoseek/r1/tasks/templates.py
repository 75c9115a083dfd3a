"""Prompt templates that present a problem to the policy: DeepSeek-R1-Zero's (DeepSeek-R1 Table 1),
a compact one for small-context CPU models, and the tokenizer's chat template."""

from __future__ import annotations

from typing import Callable

from nanoseek.data.tokenizer import END_THINK, THINK
from nanoseek.errors import UserError
from nanoseek.r1.tasks.problem import Problem

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {prompt} Assistant: <think>"
)
FORMAT_INSTRUCTION = (
    "Think step by step inside <think> </think>, then give only the final answer inside "
    "<answer> </answer>."
)
TEMPLATES = ("r1_zero", "compact", "chat")


def r1_zero_prompt(problem: Problem) -> str:
    """DeepSeek-R1-Zero's template (DeepSeek-R1, Table 1), ending in an opened `<think>`."""
    text = problem.prompt_text.strip()
    if not text.endswith((".", "?", "!")):
        text += "."
    return R1_ZERO_TEMPLATE.format(prompt=text)


def compact_prompt(problem: Problem) -> str:
    """A few tokens instead of ~80: small CPU models have ~256-token contexts. Ends in `<think>`."""
    return f"Q: {problem.meta.get('compact', problem.prompt_text)}\n{THINK}"


def chat_messages(problem: Problem) -> list[dict]:
    """The question as the one user turn of the `chat` template."""
    return [{"role": "user", "content": f"{problem.prompt_text}\n{FORMAT_INSTRUCTION}"}]


def chat_prompt(problem: Problem, apply_chat_template: Callable[..., str],
                open_think: bool = True) -> str:
    """The question as a user turn rendered by the tokenizer's chat template, then (as R1's own
    template does) an opened `<think>` unless the template already ends with one."""
    text = apply_chat_template(chat_messages(problem), add_generation_prompt=True)
    if open_think and not text.rstrip().endswith(THINK):
        text += THINK
    return text


def format_prompt(problem: Problem, template: str = "r1_zero",
                  apply_chat_template: Callable[..., str] | None = None) -> str:
    """Render `problem` with the named template (one of `TEMPLATES`)."""
    if template == "r1_zero":
        return r1_zero_prompt(problem)
    if template == "compact":
        return compact_prompt(problem)
    if template == "chat":
        if apply_chat_template is None:
            raise UserError("template 'chat' needs a tokenizer with a chat template")
        return chat_prompt(problem, apply_chat_template)
    raise UserError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")


def prompt_opens_think(prompt: str) -> bool:
    """True if the prompt leaves a `<think>` open (its last `<think>` has no `</think>` after it).

    Pass this to the rewards: when the template already opened `<think>`, a well-formed completion
    contains only `</think>`, and a format check that demands both tags would never fire."""
    i = prompt.rfind(THINK)
    return i >= 0 and prompt.find(END_THINK, i) < 0
