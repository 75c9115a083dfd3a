"""Inference: latent KV cache, absorbed MLA decoding, batched sampling, MTP speculative decoding.

    from nanoseek.inference import generate, stream, SamplingParams
    rows = generate(model, [[1, 5, 9], [1, 7]], SamplingParams(max_new_tokens=64, temperature=0.7, seed=0))
    rows[0].token_ids, rows[0].logprobs, rows[0].finish_reason

`model.generate(input_ids, ...)` is the transformers-style wrapper (see `hf_generate`).
"""

from nanoseek.inference.cache import LatentKVCache
from nanoseek.inference.decode import forward_cached
from nanoseek.inference.engine import (Completion, Generation, PromptError, TokenEvent, generate, hf_generate,
                                       stream)
from nanoseek.inference.sampling import SamplingParams

__all__ = ["LatentKVCache", "SamplingParams", "Completion", "TokenEvent", "PromptError", "Generation", "generate",
           "stream", "hf_generate", "forward_cached"]
