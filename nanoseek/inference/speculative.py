"""Speculative decoding with the MTP module as the draft model (DeepSeek-V3 technical report, §2.2 and
§5.4.3: 85-90% acceptance of the second token and ~1.8x tokens per second).

The MTP module at position i reads the trunk's hidden state h_i and the embedding of token i+1 and
predicts token i+2, so right after the trunk has chosen token i+1 it can propose token i+2 for the price
of one extra block. Each step then verifies the proposal with one two-token forward of the trunk:

    trunk([cur, draft]) -> y0 (the real next token), y1 (the token after the draft)
    accept the draft if it equals y0 (greedy) or with probability min(1, p(draft) / q(draft)) (sampling),
    emit y0, and y1 too when accepted; a rejected draft's cache slot is masked out (LatentKVCache.invalidate)
    MTP([h_cur, h_draft], [y0, y1]) -> the next draft, read at the last accepted position

Greedy output is identical to plain greedy decoding. With sampling the emitted tokens follow exactly the
target (filtered, temperature-scaled) distribution: on rejection y0 is drawn from norm(max(p - q, 0)),
the standard speculative-sampling correction. Seeded sampled output differs from non-speculative
sampling with the same seed (the random draws are used differently), but is reproducible.
The MTP block keeps its own latents in one extra cache layer that shares the trunk's slots and mask.
Trunk and MTP module run through the model's own forward (`model(..., cache=)`, `model.mtp_hidden`), or,
with `compile=True`, through the compiled static-shape steps of nanoseek.inference.compiled (finished
rows then stay in the batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from nanoseek.inference.compiled import DecodeSteps, static_length
from nanoseek.inference.requests import RequestRows, TokenEvent, Tracker, pad_left
from nanoseek.inference.sampling import Sampler, SamplingParams
from nanoseek.model.cache import LatentKVCache


@dataclass
class Drafts:
    """Per batch row: the last emitted token (not yet in the cache), the MTP draft for the token after
    it, and the draft distribution q (sampling only)."""
    cur: torch.Tensor
    draft: torch.Tensor
    q: torch.Tensor | None

    def keep(self, rows: list[int]) -> None:
        self.cur, self.draft = self.cur[rows], self.draft[rows]
        self.q = None if self.q is None else self.q[rows]


def propose(model, sampler: Sampler, h_mtp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MTP hidden [B, D] -> (draft tokens [B], draft distribution q [B, V] or None when greedy)."""
    logits = model.mtp_logits(1, h_mtp).float()
    if sampler.params.greedy:
        return logits.argmax(-1), None
    q = sampler.probs(logits)
    return sampler.choose(q), q


@torch.inference_mode()
def prefill(model, prompts: Sequence[Sequence[int]], cache: LatentKVCache, sampler: Sampler
            ) -> tuple[Drafts, list[int], list[float]]:
    """Prompts into the cache (trunk and MTP layer), the first token of each row and the first draft.
    Returns the drafts and, as lists, the first tokens and their log-probabilities."""
    ids, valid = pad_left(prompts, 0, model.model.embed_tokens.weight.device)
    out = model(ids, attention_mask=valid, cache=cache, return_hidden=True, logits_to_keep=1)
    first, logprob = sampler(out.logits[:, -1].float())
    h_mtp = model.mtp_hidden(1, out.hidden_states, torch.cat([ids[:, 1:], first[:, None]], dim=1), cache=cache)
    draft, q = propose(model, sampler, h_mtp[:, -1])
    return Drafts(first, draft, q), first.tolist(), logprob.tolist()


def accept_drafts(sampler: Sampler, logits: torch.Tensor, drafts: Drafts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target logits [B, 2, V] at (cur, draft) -> (accepted [B] bool, y0 [B], y1 [B])."""
    if sampler.params.greedy:
        y0, y1 = logits.argmax(-1).unbind(1)
        return y0 == drafts.draft, y0, y1
    p0, p1 = sampler.probs(logits[:, 0]), sampler.probs(logits[:, 1])
    d = drafts.draft[:, None]
    accepted = sampler.uniform() * drafts.q.gather(1, d).squeeze(1) < p0.gather(1, d).squeeze(1)
    residual = (p0 - drafts.q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p0)
    # One draw per row either way: y1 from p1 after an acceptance, the corrected y0 after a rejection.
    second = sampler.choose(torch.where(accepted[:, None], p1, residual / residual.sum(-1, keepdim=True)))
    return accepted, torch.where(accepted, drafts.draft, second), second


@torch.inference_mode()
def verify(model, cache: LatentKVCache, sampler: Sampler, drafts: Drafts, steps: DecodeSteps | None = None
           ) -> tuple[Drafts, list, list, list]:
    """One speculative step for the whole batch. Returns the next drafts and, as lists,
    accepted flags, (y0, y1) tokens and their log-probabilities. `steps`: compiled steps, None = eager."""
    ids = torch.stack([drafts.cur, drafts.draft], dim=1)
    if steps is None:
        out = model(ids, cache=cache, return_hidden=True)
        logits, hidden = out.logits, out.hidden_states
    else:
        logits, hidden = steps.verify(ids, cache)
    logits = logits.float()
    accepted, y0, y1 = accept_drafts(sampler, logits, drafts)
    tokens = torch.stack([y0, y1], dim=1)
    logprobs = sampler.logprobs(logits).gather(-1, tokens[..., None]).squeeze(-1)
    cache.invalidate(~accepted, cache.step.start + 1)
    h_mtp = (model.mtp_hidden(1, hidden, tokens, cache=cache) if steps is None
             else steps.mtp_hidden(hidden, tokens, cache))
    last = accepted.long()  # position of the last emitted token in this step
    draft, q = propose(model, sampler, h_mtp[torch.arange(len(last), device=last.device), last])
    nxt = Drafts(torch.where(accepted, y1, y0), draft, q)
    return nxt, accepted.tolist(), tokens.tolist(), logprobs.tolist()


def stream_speculative(model, prompts: Sequence[Sequence[int]], params: SamplingParams,
                       tracker: Tracker, steps: DecodeSteps | None = None) -> Iterator[TokenEvent]:
    """`Generation(..., speculative=True)`. Each row's `Completion.drafted` /
    `.accepted` count its verification steps and accepted drafts. `steps`: compiled steps, None = eager."""
    # Each step takes two slots and emits at least one token.
    max_len = max(len(p) for p in prompts) + 2 * max(tracker.limits) + 2
    if steps is not None:
        max_len = static_length(max_len)
    cache = LatentKVCache.for_model(model, len(prompts), max_len, extra_layers=1)
    sampler = Sampler(params, len(prompts), cache.device)
    rows = RequestRows(len(prompts))
    drafts, first, logprobs = prefill(model, prompts, cache, sampler)
    for i, token, logprob in zip(rows.requests, first, logprobs):
        yield tracker.push(i, token, logprob)
    while tracker.unfinished:
        if steps is None and (kept := rows.compact(tracker, cache, sampler)) is not None:
            drafts.keep(kept)
        drafts, accepted, tokens, logprobs = verify(model, cache, sampler, drafts, steps)
        for i, ok, (y0, y1), (lp0, lp1) in zip(rows.requests, accepted, tokens, logprobs):
            if tracker.done(i):
                continue
            row = tracker.rows[i]
            row.drafted += 1
            row.accepted += ok
            yield tracker.push(i, y0, lp0)
            if ok and not tracker.done(i):
                yield tracker.push(i, y1, lp1)
