"""Inference: batched sampling over the model's latent KV cache, MTP speculative decoding, CLIs.

    from nanoseek.inference import generate, stream, SamplingParams
    rows = generate(model, [[1, 5, 9], [1, 7]], SamplingParams(max_new_tokens=64, temperature=0.7, seed=0))
    rows[0].token_ids, rows[0].logprobs, rows[0].finish_reason

`hf_generate(model, input_ids, ...)` is the transformers-style API (`nanoseek.DeepseekV3ForCausalLM.generate`).
The forward pass itself is the model's: `model(ids, cache=LatentKVCache.for_model(model, batch, max_len))`.
"""

from nanoseek.inference.engine import Generation, generate, hf_generate, next_token_logits, stream
from nanoseek.inference.requests import Completion, PromptError, TokenEvent
from nanoseek.inference.sampling import SamplingParams
from nanoseek.model.cache import LatentKVCache

__all__ = ["LatentKVCache", "SamplingParams", "Completion", "TokenEvent", "PromptError", "Generation", "generate",
           "stream", "hf_generate", "next_token_logits"]
