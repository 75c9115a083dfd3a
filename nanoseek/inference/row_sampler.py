"""Sampling for a batch whose rows each have their own parameters: a server's batch, where every row is
a different client's request (temperature, top-p, seed, ...).

`RowSampler` has the interface of `nanoseek.inference.sampling.Sampler` (`__call__`, `logprobs`,
`probs`, `choose`, `uniform`, `params.greedy`), so the speculative-decoding steps
(nanoseek.inference.speculative) run on it unchanged. Each row draws from its own generator exactly as
a one-row `Sampler` with the same parameters and seed would, so a row's tokens do not depend on which
other rows share the batch.

Greedy rows in a batch that also samples are written as one-hot distributions: the exponential race
then picks their argmax whatever the noise, and the speculative acceptance test accepts a draft exactly
when it is the argmax, so greedy rows stay greedy (and draw no random numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanoseek.inference.sampling import SamplingParams, filter_logits


@dataclass(frozen=True)
class BatchKind:
    """What the speculative steps ask of `sampler.params`: whether every row is greedy."""
    greedy: bool


class RowSampler:
    """Chooses one token per row, row b with `params[b]` and `generators[b]` (None for greedy rows)."""

    def __init__(self, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                 device: torch.device | str = "cpu"):
        if len(params) != len(generators):
            raise ValueError(f"{len(params)} rows of parameters but {len(generators)} generators")
        for p, g in zip(params, generators):
            if not p.greedy and g is None:
                raise ValueError("a sampled row needs a generator")
        self.rows, self.generators, self.device = list(params), list(generators), device
        self.params = BatchKind(all(p.greedy for p in self.rows))

    def keep(self, rows: list[int]) -> None:
        self.rows = [self.rows[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self.params = BatchKind(all(p.greedy for p in self.rows))

    def _scale(self, logits: torch.Tensor) -> torch.Tensor:
        scale = [1.0 if p.greedy or p.raw_logprobs else p.temperature for p in self.rows]
        return torch.tensor(scale, dtype=torch.float32, device=logits.device).view(-1, *[1] * (logits.dim() - 1))

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, ..., V] log-probabilities in which reported token log-probs are measured (per row, as
        `Sampler.logprobs`)."""
        return (logits.float() / self._scale(logits)).log_softmax(-1)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] sampling distribution of each row; one-hot at the argmax for greedy rows."""
        logits = logits.float()
        out = torch.empty_like(logits)
        for b, p in enumerate(self.rows):
            if p.greedy:
                out[b] = 0.0
                out[b, logits[b].argmax()] = 1.0
            else:
                out[b] = filter_logits(logits[b:b + 1], p).softmax(-1)[0]
        return out

    def choose(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of `probs` [B, V]: the exponential race with the row's own noise (the same
        draws as `Sampler.choose`); greedy rows take their argmax and draw nothing."""
        V = probs.shape[-1]
        noise = torch.stack([torch.ones(V, device=probs.device) if g is None
                             else torch.empty(V, device=probs.device).exponential_(generator=g)
                             for g in self.generators])
        return (probs / noise).argmax(-1)

    def uniform(self) -> torch.Tensor:
        """[B] U(0, 1) per sampled row (greedy rows get 0.5: with one-hot distributions any value < 1
        accepts exactly the argmax)."""
        return torch.cat([torch.full((1,), 0.5, device=self.device) if g is None else torch.rand(1, generator=g, device=g.device)
                          for g in self.generators])

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] -> (tokens [B], their log-probabilities [B])."""
        logits = logits.float()
        tokens = logits.argmax(-1)
        sampled = [b for b, p in enumerate(self.rows) if not p.greedy]
        if sampled:
            sub = RowSampler([self.rows[b] for b in sampled], [self.generators[b] for b in sampled], self.device)
            tokens[sampled] = sub.choose(sub.probs(logits[sampled]))
        return tokens, self.logprobs(logits).gather(-1, tokens[:, None]).squeeze(-1)

    # -- generator state, so a failed step can be retried with the same random draws ---------------
    def states(self) -> list[torch.Tensor | None]:
        return [None if g is None else g.get_state() for g in self.generators]

    def restore(self, states: list[torch.Tensor | None]) -> None:
        for g, s in zip(self.generators, states):
            if g is not None:
                g.set_state(s)
