"""What a generation is asked and what it returns: prompt checks, the per-token and per-prompt result
types, the stop rules that fill them, and which cache row serves which request.

Shared by the plain decode loop (nanoseek.inference.engine) and MTP speculative decoding
(nanoseek.inference.speculative), which both sit above this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.errors import UserError
from nanoseek.inference.sampling import Sampler, SamplingParams
from nanoseek.model.cache import LatentKVCache

Decode = Callable[[list[int]], str]


class PromptError(UserError, ValueError):
    """A prompt the model cannot take: empty, out-of-vocabulary ids, or longer than the context."""


@dataclass
class TokenEvent:
    """One generated token, as streamed. `index` is the prompt's position in the request list."""
    index: int
    token_id: int
    logprob: float
    finish_reason: str | None = None  # set on a row's last token: "stop" or "length"


@dataclass
class Completion:
    """One prompt's result. `logprobs[i]` is the log-probability of `token_ids[i]` (see
    nanoseek.inference.sampling for which distribution); `tokens` is an alias of `token_ids`."""
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # including the stop token, if one ended it
    logprobs: list[float] = field(default_factory=list)  # see nanoseek.inference.sampling
    finish_reason: str | None = None  # "stop" (stop token or string) or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended the row
    text: str | None = None  # decode(token_ids), when a decode function was given
    drafted: int = 0  # speculative decoding: MTP drafts proposed / accepted for this row
    accepted: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.token_ids


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ragged prompts -> ids [B, P] left-padded with `pad_id`, and valid [B, P] (None if none is padded)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, P - len(p):] = True
    return ids.to(device), (None if valid.all() else valid.to(device))


def check_prompts(model, prompts: Sequence[Sequence[int]]) -> None:
    cfg = model.config
    if not prompts:
        raise PromptError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise PromptError(f"prompt {i} is empty")
        if len(p) >= cfg.max_position_embeddings:
            raise PromptError(f"prompt {i} has {len(p)} tokens; the model's context is {cfg.max_position_embeddings} "
                              "(max_position_embeddings), which leaves no room to generate")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise PromptError(f"prompt {i} holds token ids outside the model's vocabulary [0, {cfg.vocab_size})")


class Tracker:
    """Per-request results and stop rules: stop tokens, stop strings, length limits."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 eos_token_id: int | Sequence[int] | None, decode: Decode | None):
        if params.stop_strings and decode is None:
            raise ValueError("stop_strings need a decode function (pass a tokenizer or decode=)")
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.stop_ids = set(eos) | set(params.stop_token_ids)
        self.stop_strings = list(params.stop_strings)
        # A stop string of n bytes ends within the last n + 1 tokens (every token is >= 1 byte; one more
        # for a multi-byte character split across tokens).
        self.window = max((len(s.encode()) for s in self.stop_strings), default=0) + 1
        self.decode = decode
        room = model.config.max_position_embeddings
        self.limits = [min(params.max_new_tokens, room - len(p)) for p in prompts]
        self.rows = [Completion(prompt_ids=list(p)) for p in prompts]
        self.unfinished = len(prompts)

    def done(self, i: int) -> bool:
        return self.rows[i].finish_reason is not None

    def push(self, i: int, token: int, logprob: float) -> TokenEvent:
        row = self.rows[i]
        row.token_ids.append(token)
        row.logprobs.append(logprob)
        if token in self.stop_ids:
            row.finish_reason, row.stop_reason = "stop", token
        elif self.stop_strings and (hit := self._stop_string(row.token_ids)) is not None:
            row.finish_reason, row.stop_reason = "stop", hit
        elif len(row.token_ids) >= self.limits[i]:
            row.finish_reason = "length"
        if row.finish_reason is not None:
            self.unfinished -= 1
            if self.decode is not None:
                row.text = self.decode(row.token_ids)
        return TokenEvent(i, token, logprob, row.finish_reason)

    def _stop_string(self, tokens: list[int]) -> str | None:
        tail = self.decode(tokens[-self.window:])
        return next((s for s in self.stop_strings if s in tail), None)


class RequestRows:
    """Which request each cache row serves (`requests[row]`); drops finished rows when few are left."""

    def __init__(self, n: int):
        self.requests = list(range(n))

    def compact(self, tracker: Tracker, cache: LatentKVCache, sampler: Sampler) -> list[int] | None:
        """Once at most half the rows are unfinished, drop the finished ones from the cache and the
        sampler. Returns the kept batch rows (the caller selects its own per-row tensors) or None."""
        if tracker.unfinished * 2 > len(self.requests) or tracker.unfinished == 0:
            return None
        keep = [b for b, i in enumerate(self.requests) if not tracker.done(i)]
        self.requests = [self.requests[b] for b in keep]
        cache.keep(keep)
        sampler.keep(keep)
        return keep
