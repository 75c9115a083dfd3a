"""Rule-based rewards of the R1 recipe: accuracy, format, language consistency, overlong penalty.

Each is a small pure function; `compute_rewards` combines them with `RewardConfig` weights. The
rules are strict on purpose, because GRPO optimizes whatever the reward leaves open:

* format: exactly one `<think>`, `</think>`, `<answer>`, `</answer>`, in that order, nothing but
  whitespace between `</think>` and `<answer>` or after `</answer>`. A template that already opened
  `<think>` counts as the opening tag (otherwise a format reward could never fire), and repeating
  tags or hedging with several answers earns nothing;
* accuracy: only the answer of a well-formed completion is checked, so "<answer>1</answer>
  <answer>2</answer>" cannot collect credit for whichever is right;
* language: scored only on a well-formed completion's reasoning, so an empty or garbage output
  cannot collect it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nanoseek.data.tokenizer import ANSWER, END_ANSWER, END_THINK, REASONING_TOKENS, THINK
from nanoseek.errors import UserError

if TYPE_CHECKING:
    from nanoseek.r1.tasks import Problem, Task



# ------------------------------------------------------------------ parsing completions


@dataclass(frozen=True)
class ParsedCompletion:
    """Structure of a completion. `answer` is set only when `well_formed`; `think` is the reasoning
    text when a `</think>` was found; `reason` says what is wrong ("" when well formed)."""

    well_formed: bool
    think: str | None
    answer: str | None
    reason: str = ""


def parse_completion(completion: str, prompt_opened_think: bool | None = None) -> ParsedCompletion:
    """Check the think-then-answer structure of `completion`.

    `prompt_opened_think`: whether the prompt ended with an open `<think>` (see
    `tasks.prompt_opens_think`). None guesses from the completion: no `<think>` in it means the
    prompt opened one. Pass the real value when you know it; the guess accepts a completion that
    re-opens `<think>` the prompt already opened."""
    if prompt_opened_think is None:
        prompt_opened_think = THINK not in completion
    text = (THINK if prompt_opened_think else "") + completion
    think = _think_text(text)
    for tag in REASONING_TOKENS:
        count = text.count(tag)
        if count != 1:
            return ParsedCompletion(False, think, None, f"{count} {tag} tags (need exactly 1)")
    positions = [text.index(tag) for tag in REASONING_TOKENS]
    if positions != sorted(positions):
        return ParsedCompletion(False, think, None, "tags out of order")
    if text[: positions[0]].strip():
        return ParsedCompletion(False, think, None, "text before <think>")
    if text[positions[1] + len(END_THINK): positions[2]].strip():
        return ParsedCompletion(False, think, None, "text between </think> and <answer>")
    if text[positions[3] + len(END_ANSWER):].strip():
        return ParsedCompletion(False, think, None, "text after </answer>")
    answer = text[positions[2] + len(ANSWER): positions[3]].strip()
    if not answer:
        return ParsedCompletion(False, think, None, "empty answer")
    return ParsedCompletion(True, think, answer)


def _think_text(text: str) -> str | None:
    start, end = text.find(THINK), text.find(END_THINK)
    if start < 0 or end < start:
        return None
    return text[start + len(THINK): end].strip()


_ANSWER_RE = re.compile(f"{re.escape(ANSWER)}((?:(?!{re.escape(ANSWER)}|{re.escape(END_ANSWER)}).)*)"
                        f"{re.escape(END_ANSWER)}", re.S)


def extract_answer(completion: str) -> str | None:
    """Stripped content of the last well-formed `<answer>...</answer>` (no answer tag inside it),
    or None. Lenient, for evaluation and voting; rewards use `parse_completion`'s strict answer."""
    matches = _ANSWER_RE.findall(completion)
    if not matches:
        return None
    answer = matches[-1].strip()
    return answer or None


# ------------------------------------------------------------------ individual rewards


def format_reward(completion: str, prompt_opened_think: bool | None = None) -> float:
    """1.0 for a well-formed think-then-answer completion, else 0.0."""
    return 1.0 if parse_completion(completion, prompt_opened_think).well_formed else 0.0


def accuracy_reward(completion: str, problem: Problem, task: Task,
                    prompt_opened_think: bool | None = None) -> float:
    """The task's score for the answer of a well-formed completion; 0.0 if malformed."""
    parsed = parse_completion(completion, prompt_opened_think)
    return task.score(parsed.answer, problem) if parsed.well_formed else 0.0


_SCRIPT_ALIASES = {"en": "latin", "english": "latin", "ascii": "latin", "zh": "cjk",
                   "chinese": "cjk", "ru": "cyrillic", "russian": "cyrillic"}
# Scripts written without spaces: each character counts as a word.
_UNSPACED = {"CJK", "HIRAGANA", "KATAKANA"}


def _script(ch: str) -> str:
    if ch.isascii():
        return "LATIN"
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else "UNKNOWN"


def _words_by_script(text: str) -> list[str]:
    """Script of each word: a word is a run of letters in one script (digits and symbols split
    words and are ignored); in CJK/kana every character is a word."""
    scripts: list[str] = []
    current = None
    for ch in text:
        if not ch.isalpha():
            current = None
            continue
        s = _script(ch)
        if s != current or s in _UNSPACED:
            scripts.append(s)
        current = s
    return scripts


def language_consistency(text: str, script: str = "latin") -> float:
    """Share of words written in the target script (R1's language-consistency reward).

    `script` is a Unicode script name prefix ("latin", "cjk", "cyrillic", "greek", ...) or an alias
    ("en", "zh", "ru"). Text with no words at all (pure arithmetic) is consistent: 1.0."""
    target = _SCRIPT_ALIASES.get(script.lower(), script.lower()).upper()
    scripts = _words_by_script(text)
    if not scripts:
        return 1.0
    return sum(s == target for s in scripts) / len(scripts)


def language_reward(completion: str, script: str = "latin",
                    prompt_opened_think: bool | None = None) -> float:
    """Language consistency of the reasoning of a well-formed completion; 0.0 if malformed (an
    empty or garbled output must not earn a reward for having "no foreign words")."""
    parsed = parse_completion(completion, prompt_opened_think)
    if not parsed.well_formed:
        return 0.0
    return language_consistency(parsed.think or "", script)


def overlong_penalty(n_tokens: int, max_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment, in [-1, 0]: 0 up to max_tokens - buffer, then a linear ramp
    down to -1 at max_tokens, -1 beyond. Discourages truncated answers without a cliff."""
    if max_tokens <= 0 or not 0 <= buffer <= max_tokens:
        raise UserError(f"overlong penalty needs max_tokens > 0 and 0 <= buffer <= max_tokens; "
                        f"got max_tokens={max_tokens}, buffer={buffer}")
    if n_tokens > max_tokens:
        return -1.0
    start = max_tokens - buffer
    if n_tokens <= start:
        return 0.0
    return (start - n_tokens) / buffer


# ------------------------------------------------------------------ weighted sum

REWARD_NAMES = ("accuracy", "format", "language", "overlong")

# Our choices where the papers give none. "tinyzero" reproduces TinyZero's countdown scheme exactly:
# correct (hence well formed) -> 0.9 + 0.1 = 1.0, well formed but wrong -> 0.1, malformed -> 0.
REWARD_PRESETS: dict[str, dict[str, float]] = {
    "r1_zero": {"accuracy": 1.0, "format": 0.5},
    "r1": {"accuracy": 1.0, "format": 0.5, "language": 1.0},
    "tinyzero": {"accuracy": 0.9, "format": 0.1},
    "dapo": {"accuracy": 1.0, "overlong": 1.0},
    "accuracy": {"accuracy": 1.0},
}


@dataclass
class RewardConfig:
    """Weights of the reward components (missing ones weigh 0), the overlong buffer in tokens
    (None: a fifth of max_tokens, as DAPO's 4096 of 20480) and the target script of the CoT."""

    weights: dict[str, float] = field(default_factory=lambda: dict(REWARD_PRESETS["r1_zero"]))
    overlong_buffer: int | None = None
    language: str = "latin"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(REWARD_NAMES))
        if unknown:
            raise UserError(f"unknown reward {', '.join(unknown)}; rewards: "
                            f"{', '.join(REWARD_NAMES)}")
        self.weights = {k: float(v) for k, v in self.weights.items()}

    @classmethod
    def preset(cls, name: str, **kwargs) -> RewardConfig:
        """A named weighting: r1_zero, r1, tinyzero, dapo, accuracy."""
        if name not in REWARD_PRESETS:
            raise UserError(f"unknown reward preset {name!r}; presets: {', '.join(REWARD_PRESETS)}")
        return cls(weights=dict(REWARD_PRESETS[name]), **kwargs)

    @classmethod
    def parse(cls, spec: str, **kwargs) -> RewardConfig:
        """From a preset name or "accuracy=1,format=0.1" (for command lines)."""
        if "=" not in spec:
            return cls.preset(spec.strip(), **kwargs)
        weights = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, _, value = item.partition("=")
            try:
                weights[key.strip()] = float(value)
            except ValueError:
                raise UserError(f"reward weight {item!r} is not name=number") from None
        return cls(weights=weights, **kwargs)


def compute_rewards(completion: str, problem: Problem, task: Task, n_tokens: int | None = None,
                    max_tokens: int | None = None, config: RewardConfig | None = None, *,
                    prompt_opened_think: bool | None = None) -> dict[str, float]:
    """All reward components of one completion plus their weighted sum under "total".

    Components are always reported (for logging) even at weight 0; "overlong" is 0.0 without
    `max_tokens`. The task's verifier runs under its time limit and any failure scores 0."""
    config = config or RewardConfig()
    parsed = parse_completion(completion, prompt_opened_think)
    ok = parsed.well_formed
    rewards = {
        "accuracy": task.score(parsed.answer, problem) if ok else 0.0,
        "format": 1.0 if ok else 0.0,
        "language": language_consistency(parsed.think or "", config.language) if ok else 0.0,
        "overlong": _overlong(n_tokens, max_tokens, config),
    }
    rewards["total"] = sum(w * rewards[k] for k, w in config.weights.items())
    return rewards


def _overlong(n_tokens: int | None, max_tokens: int | None, config: RewardConfig) -> float:
    if max_tokens is None or n_tokens is None:
        if config.weights.get("overlong", 0.0):
            raise UserError("the overlong reward needs n_tokens and max_tokens")
        return 0.0
    buffer = config.overlong_buffer if config.overlong_buffer is not None else max_tokens // 5
    return overlong_penalty(n_tokens, max_tokens, buffer)
