"""Long-context decoding: per-token decode time and KV-cache memory at 1k, 4k and 16k tokens of context,
nanoseek's latent cache (eager and compiled) vs transformers' DeepseekV3, same weights, same run.

    python benchmarks/long_context_decode.py [--threads 1] [--contexts 1024 4096 16384] [--steps 16]

The model is the `bench` preset with max_position_embeddings raised to fit, random weights. Both caches
are filled with the same random latents for `context` tokens (a prefill of 16k tokens would take minutes
and says nothing about decoding; the attention cost of a step does not depend on the values), then each
engine decodes `--steps` greedy tokens from there: the median step time is reported, and the tokens are
checked to be identical across engines (both caches hold the same latents, so they must agree).

Memory is measured from the tensors each cache holds. transformers 5 also caches the latent per layer
(keys = c, values = k_pe), so the bytes per token are the same; what grows with context on its side is
the work per step: every step re-expands every past token through kv_b_proj into per-head keys and values
(and materialises them: H * (d_qk + d_v) * 4 bytes per token and layer, transient), while the absorbed
path attends over the latents directly. Both are reported, the transient as computed from the shapes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.inference import LatentKVCache  # noqa: E402
from nanoseek.inference.compiled import decode_steps, static_length  # noqa: E402
from nanoseek.inference.engine import next_token_logits  # noqa: E402


def filled_caches(ours, hf, context: int, new: int, compiled: bool, seed: int = 0):
    """A LatentKVCache and a transformers DynamicCache holding the same random latents for `context` tokens."""
    cfg = ours.config
    g = torch.Generator().manual_seed(seed)
    r = cfg.kv_lora_rank
    latents = [torch.randn(1, context, r + cfg.qk_rope_head_dim, generator=g) for _ in range(cfg.num_hidden_layers)]
    length = context + new
    cache = LatentKVCache.for_model(ours, 1, static_length(length) if compiled else length)
    for kv, lat in zip(cache.kv_layers, latents):
        kv[:, :context] = lat
    cache.bias[:, :context] = 0.0
    cache.lengths += context
    cache.slot = context
    with torch.inference_mode():
        hf_cache = hf(torch.zeros(1, 1, dtype=torch.long), use_cache=True).past_key_values
    for layer, lat in zip(hf_cache.layers, latents):
        layer.keys = lat[:, None, :, :r].contiguous()
        layer.values = lat[:, None, :, r:].contiguous()
    return cache, hf_cache


def decode(step, first: torch.Tensor, steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and per-step seconds of `step(token [1, 1]) -> logits [1, V]`."""
    tokens, times, tok = [], [], first
    with torch.inference_mode():
        for _ in range(steps):
            start = time.perf_counter()
            tok = step(tok).argmax(-1)[:, None]
            times.append(time.perf_counter() - start)
            tokens.append(tok.item())
    return tokens, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--steps", type=int, default=16, help="greedy tokens decoded per engine and context")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="reuse inductor's disk cache (default: an empty one, so compile times are a first run's)")
    args = p.parse_args()
    if not args.warm_compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanoseek-inductor-")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    torch.manual_seed(0)
    cfg = preset("bench", max_position_embeddings=max(args.contexts) + 1024)
    with tempfile.TemporaryDirectory() as tmp:
        nanoseek.DeepseekV3ForCausalLM(cfg).save_pretrained(tmp)
        ours = nanoseek.from_pretrained(tmp).eval()
        hf = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa",
                                                  experts_implementation="grouped_mm").eval()
    compiled = not args.no_compile and decode_steps(ours) is not None
    print(f"bench preset, max_position_embeddings {cfg.max_position_embeddings}, float32, batch 1, "
          f"{torch.get_num_threads()} thread(s), {args.steps} greedy steps per engine, median step time")
    print(f"\n{'context':>7} {'nanoseek eager':>15} {'compiled':>10} {'transformers':>13} {'eager/hf':>9} "
          f"{'compiled/hf':>12}   {'cache MB: nanoseek':>18} {'transformers':>13}  {'hf transient K/V MB':>19}  same tokens")
    first = torch.tensor([[5]])
    for context in args.contexts:
        new = args.steps + 1
        times, tokens, compile_s = {}, {}, 0.0
        cache, hf_cache = filled_caches(ours, hf, context, new, compiled=False)
        tokens["eager"], t = decode(lambda tok: next_token_logits(ours, tok, cache), first, args.steps)
        times["eager"] = t
        ours_bytes = cache.bytes_per_token() * context
        with torch.inference_mode():
            tokens["hf"], times["hf"] = decode(
                lambda tok: hf(tok, past_key_values=hf_cache, use_cache=True).logits[:, -1], first, args.steps)
        hf_bytes = sum(t.numel() * t.element_size() for layer in hf_cache.layers for t in (layer.keys, layer.values))
        hf_bytes *= context / (context + args.steps)  # the cache now holds the decoded tokens too
        if compiled:
            steps = decode_steps(ours)
            before = steps.compile_seconds
            cache, _ = filled_caches(ours, hf, context, new, compiled=True)
            tokens["compiled"], times["compiled"] = decode(lambda tok: steps.logits(tok, cache), first, args.steps)
            compile_s = steps.compile_seconds - before
            times["compiled"] = times["compiled"][1:]  # the first step compiled
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        transient = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4 * context / 2**20
        same = all(t == tokens["eager"] for t in tokens.values())
        comp = f"{med['compiled']:>8.2f}ms" if compiled else f"{'-':>10}"
        ratio = f"{med['hf'] / med['compiled']:>11.2f}x" if compiled else f"{'-':>12}"
        print(f"{context:>7} {med['eager']:>13.2f}ms {comp} {med['hf']:>11.2f}ms {med['hf'] / med['eager']:>8.2f}x "
              f"{ratio}   {ours_bytes / 2**20:>18.2f} {hf_bytes / 2**20:>13.2f}  {transient:>19.1f}  {same}"
              + (f"   (compile {compile_s:.0f}s)" if compiled else ""))
    print(f"\nnanoseek cache: {cache.bytes_per_token():.0f} bytes/token measured ((r_kv + d_r) * layers * 4); an "
          f"expanded per-head K/V cache would hold H * (d_qk + d_v) * layers * 4 = "
          f"{cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * 4} bytes/token")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
