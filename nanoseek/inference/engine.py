"""Batched generation over the latent KV cache: prefill, decode loop, stopping, streaming.

    prompts (ragged) -> left-padded batch -> one prefill forward -> sample -> one-token decode steps ...

Prefill and decode share one code path, the absorbed attention of `MLA.decode`: the prompt is written
into the latent cache once, chunked or multi-turn prefill needs nothing special, and the latents the
decode steps read are the very ones prefill wrote. The price is attention FLOPs in prefill of
(kv_lora_rank + rope) instead of (nope + rope) per head and key, negligible for prompts of this size.

Rows that finish stop emitting; once at most half the batch is still running, finished rows are
dropped from the cache (one copy), so a long straggler does not drag a full batch along.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.errors import UserError
from nanoseek.inference.cache import LatentKVCache
from nanoseek.inference.decode import forward_cached
from nanoseek.inference.sampling import Sampler, SamplingParams

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


# ---------------------------------------------------------------------------------------------- bookkeeping
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


class Batch:
    """Which request each cache row serves; drops finished rows when few are left running."""

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


# ---------------------------------------------------------------------------------------------- loop
@torch.inference_mode()
def _prefill(model, prompts, cache: LatentKVCache) -> torch.Tensor:
    ids, valid = pad_left(prompts, 0, cache.kv.device)
    return model.lm_head(forward_cached(model, ids, cache, valid)[:, -1])


@torch.inference_mode()
def _decode_step(model, tokens: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
    return model.lm_head(forward_cached(model, tokens[:, None], cache)[:, -1])


@torch.inference_mode()
def _sample(sampler: Sampler, logits: torch.Tensor) -> tuple[torch.Tensor, list[int], list[float]]:
    tokens, logprobs = sampler(logits)
    return tokens, tokens.tolist(), logprobs.tolist()


class Generation:
    """One batched generation, consumed by iterating: yields a `TokenEvent` per new token as soon as it
    is chosen (tokens of one step in request order; a row's last event carries its finish reason), and
    fills `completions` (one `Completion` per prompt) as it goes.

    `eos_token_id` (int or list) and `params.stop_token_ids` end a row; so do `params.stop_strings`,
    checked on `decode` of the row's latest tokens. `speculative=True` drafts with the MTP module (see
    nanoseek.inference.speculative). Grad mode is switched off only inside the compute, never across
    a yield, so the caller's code between tokens runs in its own mode. Put the model in eval mode
    first (as for any inference: in training mode MoE layers would count expert loads on accelerators).
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
                 eos_token_id: int | Sequence[int] | None = None, decode: Decode | None = None,
                 speculative: bool = False):
        self.model, self.prompts, self.params = model, [list(p) for p in prompts], params or SamplingParams()
        self.params.validate()
        check_prompts(model, self.prompts)
        self.tracker = Tracker(model, self.prompts, self.params, eos_token_id, decode)
        self.speculative = speculative
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs an MTP module (config num_nextn_predict_layers >= 1); "
                             "this model has none (checkpoints saved by transformers drop it)")

    @property
    def completions(self) -> list[Completion]:
        return self.tracker.rows

    def __iter__(self) -> Iterator[TokenEvent]:
        if self.speculative:
            from nanoseek.inference.speculative import stream_speculative

            return stream_speculative(self.model, self.prompts, self.params, self.tracker)
        return self._plain()

    def _plain(self) -> Iterator[TokenEvent]:
        model, prompts, tracker = self.model, self.prompts, self.tracker
        max_len = max(len(p) for p in prompts) + max(tracker.limits)
        cache = LatentKVCache.for_model(model, len(prompts), max_len)
        sampler = Sampler(self.params, len(prompts), cache.kv.device)
        batch = Batch(len(prompts))
        logits = _prefill(model, prompts, cache)
        while True:
            tokens, token_list, logprobs = _sample(sampler, logits)
            for i, token, logprob in zip(batch.requests, token_list, logprobs):
                if not tracker.done(i):
                    yield tracker.push(i, token, logprob)
            if tracker.unfinished == 0:
                return
            if (kept := batch.compact(tracker, cache, sampler)) is not None:
                tokens = tokens[kept]
            logits = _decode_step(model, tokens, cache)


def stream(model, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
           eos_token_id: int | Sequence[int] | None = None, decode: Decode | None = None,
           speculative: bool = False) -> Iterator[TokenEvent]:
    """Token events of a batched generation as they are chosen (see `Generation`)."""
    return iter(Generation(model, prompts, params, eos_token_id=eos_token_id, decode=decode, speculative=speculative))


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
             eos_token_id: int | Sequence[int] | None = None, decode: Decode | None = None,
             speculative: bool = False) -> list[Completion]:
    """Generate for a batch of token-id prompts; one `Completion` per prompt (tokens, log-probs,
    finish reason). Ragged prompts are fine: they are left-padded and masked."""
    run = Generation(model, prompts, params, eos_token_id=eos_token_id, decode=decode, speculative=speculative)
    for _ in run:
        pass
    return run.completions


def generate_batch(model, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
                   eos_id: int | Sequence[int] | None = None, **kwargs) -> list[Completion]:
    """`generate` under the name and `eos_id` keyword nanoseek.r1.rollout looks for."""
    return generate(model, prompts, params, eos_token_id=eos_id, **kwargs)


# ---------------------------------------------------------------------------------------------- HF-style API
def hf_generate(model, input_ids: torch.Tensor, max_new_tokens: int = 20, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
                pad_token_id: int | None = None, stop_strings: str | Sequence[str] | None = None,
                tokenizer=None, seed: int | Sequence[int] | None = None, do_sample: bool | None = None,
                speculative: bool = False) -> torch.Tensor:
    """`transformers`-style generation: LongTensor [B, prompt_len + new] = the input ids (padding
    included) followed by each row's new tokens, rows that stopped early padded with `pad_token_id`.

    `attention_mask` marks real prompt tokens (left padding, as transformers expects; any padding works).
    `temperature=0` is greedy; `do_sample=True` with temperature 0 samples at temperature 1, and
    `do_sample=False` forces greedy. `eos_token_id=None` uses the config's; pass `[]` for none.
    `stop_strings` need `tokenizer` (anything with `decode(ids)`). `pad_token_id` defaults to the
    config's, then to the eos id.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if do_sample is False:
        temperature = 0.0
    elif do_sample and temperature == 0:
        temperature = 1.0
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos_list = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    pad = pad if pad is not None else (eos_list[0] if eos_list else 0)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prompts = [row[m].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0, top_p=top_p,
                            min_p=min_p, stop_strings=tuple(stop_strings or ()), seed=seed)
    decode = None if tokenizer is None else (lambda ids: tokenizer.decode(ids))
    rows = generate(model, prompts, params, eos_token_id=eos_list, decode=decode, speculative=speculative)
    new = max(len(r.token_ids) for r in rows)
    out = torch.full((input_ids.shape[0], new), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
    return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
