"""Batched generation over the latent KV cache: prefill, decode loop, stopping, streaming.

    prompts (ragged) -> left-padded batch -> one prefill forward -> sample -> one-token decode steps ...

Prefill and decode are the model's own forward with a cache (absorbed MLA attention, see
nanoseek.model.mla): the prompt is written into the latent cache once, chunked or multi-turn prefill
needs nothing special, and the latents the decode steps read are the very ones prefill wrote. The price is attention FLOPs in prefill of
(kv_lora_rank + rope) instead of (nope + rope) per head and key, negligible for prompts of this size.

Rows that finish stop emitting; once at most half the batch is still running, finished rows are
dropped from the cache (one copy), so a long straggler does not drag a full batch along.

`compile=True` decodes with one compiled static-shape step (nanoseek.inference.compiled): the cache is
preallocated at a bucketed length, every decode step has the same shapes, and finished rows stay in the
batch (a smaller batch would be a new compilation). Prefill stays eager.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from nanoseek.inference.compiled import DecodeSteps, decode_steps, static_length
from nanoseek.inference.requests import (Completion, Decode, PromptError, RequestRows, TokenEvent, Tracker,
                                         check_prompts, pad_left)
from nanoseek.inference.sampling import Sampler, SamplingParams
from nanoseek.inference.speculative import stream_speculative
from nanoseek.model.cache import LatentKVCache

__all__ = ["Generation", "stream", "generate", "hf_generate", "next_token_logits", "Completion", "TokenEvent",
           "PromptError"]


# ---------------------------------------------------------------------------------------------- loop
@torch.inference_mode()
def next_token_logits(model, ids: torch.Tensor, cache: LatentKVCache, valid: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Append ids [B, T] to the cache through the model's forward and return the logits [B, V] that
    choose each row's next token. `valid` [B, T] marks real tokens (left padding)."""
    return model(ids, attention_mask=valid, cache=cache, logits_to_keep=1).logits[:, -1]


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
    nanoseek.inference.speculative). `compile=True` runs decode (and verify) steps compiled (see
    nanoseek.inference.compiled; eager, after a one-line notice, where this machine cannot compile). Grad mode is switched off only inside the compute, never across
    a yield, so the caller's code between tokens runs in its own mode. Put the model in eval mode
    first (as for any inference: in training mode MoE layers would count expert loads on accelerators).
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
                 eos_token_id: int | Sequence[int] | None = None, decode: Decode | None = None,
                 speculative: bool = False, compile: bool = False):
        self.model, self.prompts, self.params = model, [list(p) for p in prompts], params or SamplingParams()
        self.params.validate()
        check_prompts(model, self.prompts)
        self.tracker = Tracker(model, self.prompts, self.params, eos_token_id, decode)
        self.speculative = speculative
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding needs an MTP module (config num_nextn_predict_layers >= 1); "
                             "this model has none (checkpoints saved by transformers drop it)")
        self.steps: DecodeSteps | None = decode_steps(model) if compile else None

    @property
    def completions(self) -> list[Completion]:
        return self.tracker.rows

    def __iter__(self) -> Iterator[TokenEvent]:
        if self.speculative:
            return stream_speculative(self.model, self.prompts, self.params, self.tracker, self.steps)
        return self._plain()

    def _plain(self) -> Iterator[TokenEvent]:
        model, prompts, tracker, steps = self.model, self.prompts, self.tracker, self.steps
        max_len = max(len(p) for p in prompts) + max(tracker.limits)
        cache = LatentKVCache.for_model(model, len(prompts), max_len if steps is None else static_length(max_len))
        sampler = Sampler(self.params, len(prompts), cache.device)
        rows = RequestRows(len(prompts))
        ids, valid = pad_left(prompts, 0, cache.device)
        logits = next_token_logits(model, ids, cache, valid)
        while True:
            tokens, token_list, logprobs = _sample(sampler, logits)
            for i, token, logprob in zip(rows.requests, token_list, logprobs):
                if not tracker.done(i):
                    yield tracker.push(i, token, logprob)
            if tracker.unfinished == 0:
                return
            if steps is not None:
                logits = steps.logits(tokens[:, None], cache)
                continue
            if (kept := rows.compact(tracker, cache, sampler)) is not None:
                tokens = tokens[kept]
            logits = next_token_logits(model, tokens[:, None], cache)


def stream(model, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
           eos_token_id: int | Sequence[int] | None = None, decode: Decode | None = None,
           speculative: bool = False, compile: bool = False) -> Iterator[TokenEvent]:
    """Token events of a batched generation as they are chosen (see `Generation`)."""
    return iter(Generation(model, prompts, params, eos_token_id=eos_token_id, decode=decode, speculative=speculative,
                           compile=compile))


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
             eos_token_id: int | Sequence[int] | None = None, decode: Decode | None = None,
             speculative: bool = False, compile: bool = False) -> list[Completion]:
    """Generate for a batch of token-id prompts; one `Completion` per prompt (tokens, log-probs,
    finish reason). Ragged prompts are fine: they are left-padded and masked. `compile`: see `Generation`."""
    run = Generation(model, prompts, params, eos_token_id=eos_token_id, decode=decode, speculative=speculative,
                     compile=compile)
    for _ in run:
        pass
    return run.completions


# ---------------------------------------------------------------------------------------------- HF-style API
def hf_generate(model, input_ids: torch.Tensor, max_new_tokens: int = 20, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
                pad_token_id: int | None = None, stop_strings: str | Sequence[str] | None = None,
                tokenizer=None, seed: int | Sequence[int] | None = None, do_sample: bool | None = None,
                speculative: bool = False, compile: bool = False) -> torch.Tensor:
    """`transformers`-style generation: LongTensor [B, prompt_len + new] = the input ids (padding
    included) followed by each row's new tokens, rows that stopped early padded with `pad_token_id`.

    `attention_mask` marks real prompt tokens (left padding, as transformers expects; any padding works).
    `temperature=0` is greedy; `do_sample=True` with temperature 0 samples at temperature 1, and
    `do_sample=False` forces greedy. `eos_token_id=None` uses the config's; pass `[]` for none.
    `stop_strings` need `tokenizer` (anything with `decode(ids)`). `pad_token_id` defaults to the
    config's, then to the eos id. `compile=True`: compiled decode steps (see `Generation`).
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
    rows = generate(model, prompts, params, eos_token_id=eos_list, decode=decode, speculative=speculative,
                    compile=compile)
    new = max(len(r.token_ids) for r in rows)
    out = torch.full((input_ids.shape[0], new), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
    return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
