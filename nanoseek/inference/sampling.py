"""Next-token selection: temperature, top-k, top-p, min-p, per-row seeded generators, log-probabilities.

Log-probabilities are those of the chosen token under the temperature-scaled but *unfiltered*
distribution, `log_softmax(logits / temperature)` (plain `log_softmax(logits)` when greedy). That is the
distribution a policy-gradient trainer recomputes from the model (GRPO's pi_old), whereas the
top-k/top-p/min-p truncation is a property of the sampler only. `SamplingParams(raw_logprobs=True)`
reports `log_softmax(logits)` instead, whatever the temperature.

Randomness: each row owns a `torch.Generator` seeded with its own seed and draws exactly one
vocabulary-sized block of noise per token (exponential race: argmax p / E with E ~ Exp(1) is an exact
categorical sample), so a row's output depends on its seed and prompt only, not on which other rows
share the batch or when they finish.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanoseek.errors import is_finite_number, require


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    stop_token_ids: Sequence[int] = ()  # in addition to the eos id given to the engine
    stop_strings: Sequence[str] = ()  # need a decode function
    seed: int | Sequence[int] | None = None  # int: row i uses seed + i; list: one per row
    raw_logprobs: bool = False

    def validate(self) -> None:
        """One `SettingError` (a ValueError and a UserError) naming the first field out of range."""
        require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens",
                self.max_new_tokens, "an integer >= 1")
        require(is_finite_number(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
                "a finite number >= 0 (0 = greedy)")
        require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        require(is_finite_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        require(is_finite_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        require(all(self.stop_strings), "stop_strings", list(self.stop_strings), "non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def row_seeds(self, batch: int) -> list[int]:
        """One seed per row. Without a seed, rows draw theirs from torch's global RNG, so
        `torch.manual_seed` still makes a run reproducible."""
        if self.seed is None:
            return torch.randint(0, 2**62, (batch,)).tolist()
        if isinstance(self.seed, int):
            return [self.seed + i for i in range(batch)]
        if len(self.seed) != batch:
            raise ValueError(f"got {len(self.seed)} seeds for {batch} prompts")
        return [int(s) for s in self.seed]


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits [B, V] (float32) with tokens outside top-k / top-p / min-p set to -inf."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop = probs.cumsum(-1) - probs >= p.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


class Sampler:
    """Chooses tokens for a batch whose rows each own a seeded generator."""

    def __init__(self, params: SamplingParams, batch: int, device: torch.device | str = "cpu"):
        self.params = params
        self.generators = []
        if not params.greedy:
            for seed in params.row_seeds(batch):
                self.generators.append(torch.Generator(device=device).manual_seed(seed))

    def keep(self, rows: list[int]) -> None:
        """Follow a batch that dropped rows (see `LatentKVCache.keep`)."""
        if self.generators:
            self.generators = [self.generators[i] for i in rows]

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] log-probabilities in which reported token log-probs are measured."""
        p = self.params
        scale = 1.0 if p.greedy or p.raw_logprobs else p.temperature
        return (logits.float() / scale).log_softmax(-1)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] sampling distribution after temperature and truncation (not for greedy)."""
        return filter_logits(logits.float(), self.params).softmax(-1)

    def choose(self, probs: torch.Tensor) -> torch.Tensor:
        """Sample one token per row of `probs` [B, V], each row with its own generator."""
        V = probs.shape[-1]
        noise = torch.stack([torch.empty(V, device=probs.device).exponential_(generator=g) for g in self.generators])
        return (probs / noise).argmax(-1)

    def uniform(self) -> torch.Tensor:
        """[B] U(0, 1), one draw per row from that row's generator (speculative acceptance test)."""
        return torch.cat([torch.rand(1, generator=g, device=g.device) for g in self.generators])

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] -> (tokens [B], their log-probabilities [B])."""
        tokens = logits.argmax(-1) if self.params.greedy else self.choose(self.probs(logits))
        return tokens, self.logprobs(logits).gather(-1, tokens[:, None]).squeeze(-1)
