"""Decode throughput: nanoseek's latent-cache engine vs `transformers.generate`, same weights, same run.

    python benchmarks/decode_throughput.py [--threads 1] [--repeats 5] [--train-steps 200] [--skip-mtp] [--no-compile]
                                           [--batches 1 8]

Part 1 (the `bench` preset, random weights): greedy decoding of 128 new tokens after a 32-token prompt at
batch 1 and batch 8, nanoseek (`nanoseek.inference.generate`, eager and with `compile=True`) vs transformers
(`AutoModelForCausalLM` loaded from the directory nanoseek saved; sdpa attention, each experts implementation
transformers offers, the fastest one reported). Tokens/s counts new tokens over the whole call (prefill
included), best of `--repeats` interleaved runs, so all see the same machine load; next to the wall-clock
figure, the same from process CPU time (robust to other processes taking the cores). Outputs are checked
to be identical. The compiled engine's compilation (first call per batch size) is timed apart and shown
with the break-even: how many generated tokens it takes to earn it back against eager decoding.
KV-cache bytes per token are measured from the tensors each cache holds. (transformers 5 caches the same
latent per layer, keys = c [B, 1, T, r_kv] and values = k_pe [B, 1, T, d_r], but re-expands every past
token through kv_b_proj at every step; a cache of per-head K/V would hold H * (d_qk + d_v) per layer.)

Part 2 (MTP speculative decoding): the `bench` preset with one MTP module, trained for `--train-steps`
steps on byte-level Python source from the standard library (an untrained MTP head drafts at chance, so
acceptance would say nothing), then plain vs speculative greedy decoding of 8 held-out prompts at batch 1
and 8: acceptance rate, speedup, and what one verify step costs in plain steps (the break-even point).
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.inference import LatentKVCache, SamplingParams, generate  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 32, 128


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def hf_cache_bytes_per_token(hf, prompt: torch.Tensor) -> float:
    """Bytes per token of transformers' DynamicCache after a forward over `prompt` (all layers)."""
    with torch.inference_mode():
        cache = hf(prompt, use_cache=True).past_key_values
    total = 0
    for layer in cache.layers:
        total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total / prompt.numel()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def part1(args) -> None:
    from transformers import AutoModelForCausalLM

    from nanoseek.inference.compiled import decode_steps

    torch.manual_seed(0)
    cfg = preset("bench")
    with tempfile.TemporaryDirectory() as tmp:
        nanoseek.DeepseekV3ForCausalLM(cfg).save_pretrained(tmp)
        ours = nanoseek.from_pretrained(tmp).eval()
        hfs = {}
        for impl in args.hf_experts:
            hfs[impl] = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa",
                                                             experts_implementation=impl).eval()
    print(f"bench preset: {ours.num_parameters() / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, "
          f"float32, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    compiled = not args.no_compile and decode_steps(ours) is not None
    engines = ["nanoseek"] + (["nanoseek+compile"] if compiled else [])
    rows = []
    for batch in args.batches:
        prompt = torch.randint(3, cfg.vocab_size, (batch, PROMPT_LEN))
        ids = prompt.tolist()
        params = SamplingParams(max_new_tokens=NEW_TOKENS)

        def run_ours(engine):
            return generate(ours, ids, params, eos_token_id=[], compile=engine == "nanoseek+compile")

        def run_hf(model):
            with torch.inference_mode():
                return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)

        outputs, compile_s = {}, 0.0
        for engine in engines:
            before = decode_steps(ours).compile_seconds if engine == "nanoseek+compile" else 0.0
            outputs[engine] = torch.tensor([r.token_ids for r in run_ours(engine)])
            if engine == "nanoseek+compile":
                compile_s = decode_steps(ours).compile_seconds - before
        for impl, model in hfs.items():
            outputs[f"hf[{impl}]"] = run_hf(model)[:, PROMPT_LEN:]
        for name, out in outputs.items():
            if not torch.equal(out, outputs["nanoseek"]):
                print(f"  WARNING: batch {batch}: {name} and nanoseek (eager) greedy outputs differ")
        wall = {k: float("inf") for k in engines + list(hfs)}  # transformers by experts implementation
        cpu = dict(wall)
        for _ in range(args.repeats):  # interleaved, so all see the same machine load
            for engine in engines:
                w, c = timed(lambda: run_ours(engine))
                wall[engine], cpu[engine] = min(wall[engine], w), min(cpu[engine], c)
            for impl, model in hfs.items():
                w, c = timed(lambda: run_hf(model))
                wall[impl], cpu[impl] = min(wall[impl], w), min(cpu[impl], c)
        rows.append((batch, wall, cpu, compile_s))
    n_hf = list(hfs)
    print(f"\nnew tokens/s (wall clock; process CPU time in brackets), {NEW_TOKENS} new tokens after {PROMPT_LEN}")
    print(f"{'batch':>5} " + " ".join(f"{name:>22}" for name in engines + [f"hf[{k}]" for k in n_hf])
          + "   ratio vs best hf: " + ", ".join(engines))
    for batch, wall, cpu, compile_s in rows:
        tps = lambda t: batch * NEW_TOKENS / t  # noqa: E731
        best = min(n_hf, key=lambda k: wall[k])
        best_cpu = min(n_hf, key=lambda k: cpu[k])
        cells = [f"{tps(wall[k]):>10.0f} ({tps(cpu[k]):>8.0f})" for k in engines + n_hf]
        ratios = [f"{wall[best] / wall[e]:.2f}x ({cpu[best_cpu] / cpu[e]:.2f}x)" for e in engines]
        print(f"{batch:>5} " + " ".join(f"{c:>22}" for c in cells) + "   " + ", ".join(ratios))
    if compiled:
        for batch, wall, cpu, compile_s in rows:
            saved = (wall["nanoseek"] - wall["nanoseek+compile"]) / (batch * NEW_TOKENS)
            even = f"{compile_s / saved:,.0f} new tokens" if saved > 0 else "never (not faster)"
            print(f"compile time, batch {batch}: {compile_s:.1f}s ({'reusing' if args.warm_compile_cache else 'empty'} "
                  f"inductor disk cache; later calls of this shape reuse the graph); it pays for itself after {even}")
    # cache footprint
    cache = LatentKVCache.for_model(ours, 1, 256)
    formula = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    hf_bytes = hf_cache_bytes_per_token(next(iter(hfs.values())), torch.randint(3, cfg.vocab_size, (1, PROMPT_LEN)))
    expanded = (cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)) * cfg.num_hidden_layers * 4
    print(f"\nKV cache bytes/token: nanoseek {cache.bytes_per_token():.0f} (formula (r_kv + d_r) * layers * 4 = "
          f"{formula}); transformers DynamicCache {hf_bytes:.0f} (also the latent, re-expanded every step); "
          f"an expanded per-head K/V cache would need H * (d_qk + d_v) * layers * 4 = {expanded}")


# ---------------------------------------------------------------------------------------------- part 2
def python_source_bytes(limit: int = 4_000_000) -> torch.Tensor:
    """Byte-level 'tokens' of the standard library's Python source: real text that needs no download."""
    data = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


def train_briefly(model, data: torch.Tensor, steps: int, seq: int = 128, batch: int = 16) -> float:
    """A few hundred AdamW steps of the model's own objective (next token + MTP); returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    model.train()
    loss = float("nan")
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq] for s in starts])
        out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for moe in model.moe_layers():
            moe.update_bias(1e-3)
        loss = out.lm_loss.item()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  lm loss {loss:.3f}  mtp loss {out.mtp_loss.item():.3f}", flush=True)
    model.eval()
    return loss


def teacher_forced_accuracy(model, data: torch.Tensor, n: int = 8, seq: int = 256) -> tuple[float, float]:
    """Top-1 accuracy on held-out text of the main head (token i+1) and the MTP head (token i+2)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.stack([data[s:s + seq] for s in torch.randint(0, len(data) - seq, (n,), generator=gen)])
    with torch.no_grad():
        out = model(x, return_hidden=True)
        h = model.mtp_hidden(1, out.hidden_states[:, :-1], x[:, 1:], torch.arange(seq - 1)[None])
        mtp_pred = model.mtp_logits(1, h).argmax(-1)
    main_acc = (out.logits[:, :-1].argmax(-1) == x[:, 1:]).float().mean().item()
    return main_acc, (mtp_pred[:, :-1] == x[:, 2:]).float().mean().item()


def step_costs(model, prompts: list[list[int]]) -> tuple[float, float]:
    """Seconds per plain decode step and per speculative verify step (trunk x2 + MTP block + two head reads)."""
    from nanoseek.inference import speculative as spec
    from nanoseek.inference.engine import next_token_logits
    from nanoseek.inference.sampling import Sampler

    sampler = Sampler(SamplingParams(), len(prompts))
    with torch.inference_mode():
        cache = LatentKVCache.for_model(model, len(prompts), PROMPT_LEN + 4 * NEW_TOKENS, extra_layers=1)
        drafts, _, _ = spec.prefill(model, prompts, cache, sampler)
        start = time.perf_counter()
        for _ in range(NEW_TOKENS // 2):
            drafts = spec.verify(model, cache, sampler, drafts)[0]
        verify = (time.perf_counter() - start) / (NEW_TOKENS // 2)
        tokens = drafts.cur
        start = time.perf_counter()
        for _ in range(NEW_TOKENS // 2):
            tokens = sampler(next_token_logits(model, tokens[:, None], cache))[0]
        plain = (time.perf_counter() - start) / (NEW_TOKENS // 2)
    return plain, verify


def part2(args) -> None:
    torch.manual_seed(0)
    data = python_source_bytes()
    held_out = data[-200_000:]
    if args.mtp_model:
        model = nanoseek.from_pretrained(args.mtp_model).eval()
        print(f"\nMTP speculative decoding: model from {args.mtp_model}")
    else:
        model = nanoseek.DeepseekV3ForCausalLM(preset("bench", num_nextn_predict_layers=1))
        print(f"\nMTP speculative decoding: bench preset + 1 MTP module, {args.train_steps} training steps on "
              f"{len(data) / 1e6:.1f}M bytes of stdlib Python source (byte tokens)")
        start = time.perf_counter()
        train_briefly(model, data[:-200_000], args.train_steps)
        print(f"  trained in {time.perf_counter() - start:.0f}s")
        if args.save_mtp_model:
            model.save_pretrained(args.save_mtp_model)
    main_acc, mtp_acc = teacher_forced_accuracy(model, held_out)
    print(f"  held-out top-1 accuracy: main head (next token) {main_acc:.1%}, MTP head (token after) {mtp_acc:.1%}")
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 8):
        starts = torch.randint(0, len(held_out) - PROMPT_LEN, (8,), generator=gen)
        prompts = [held_out[s:s + PROMPT_LEN].tolist() for s in starts]
        groups = [prompts[i:i + batch] for i in range(0, 8, batch)]  # 8 prompts either way
        params = SamplingParams(max_new_tokens=NEW_TOKENS)
        plain = [r for g in groups for r in generate(model, g, params, eos_token_id=[])]
        spec = [r for g in groups for r in generate(model, g, params, eos_token_id=[], speculative=True)]
        same = all(a.token_ids == b.token_ids for a, b in zip(plain, spec))
        t_plain = t_spec = float("inf")
        for _ in range(args.repeats):
            t_plain = min(t_plain, best_time(lambda: [generate(model, g, params, eos_token_id=[]) for g in groups], 1))
            t_spec = min(t_spec, best_time(lambda: [generate(model, g, params, eos_token_id=[], speculative=True)
                                                    for g in groups], 1))
        accepted, drafted = sum(r.accepted for r in spec), sum(r.drafted for r in spec)
        step_plain, step_verify = step_costs(model, groups[0])
        n = 8 * NEW_TOKENS
        print(f"  batch {batch}: acceptance {accepted / max(1, drafted):.1%} ({accepted}/{drafted}), "
              f"plain {n / t_plain:.0f} tok/s, speculative {n / t_spec:.0f} tok/s, speedup {t_plain / t_spec:.2f}x, "
              f"greedy output identical: {same}")
        ratio = step_verify / step_plain
        verdict = (f"pays off above {ratio - 1:.0%} acceptance" if ratio < 2 else
                   "can never pay off (a verify step emits at most 2 tokens)")
        print(f"           a verify step costs {ratio:.2f} plain steps, so speculation {verdict}")
    sample = bytes(plain[0].token_ids[:60]).decode("utf-8", "replace")
    print(f"  a greedy continuation: {sample!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two OpenMP threads stall for a "
                        "scheduler slice whenever the other core is busy, which swamps both engines; "
                        "0 = torch's choice)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=200, help="MTP part: training steps")
    p.add_argument("--mtp-model", help="MTP part: use this trained model directory instead of training one")
    p.add_argument("--save-mtp-model", help="MTP part: save the trained model here (reuse with --mtp-model)")
    p.add_argument("--skip-mtp", action="store_true", help="only part 1")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="part 1: batch sizes (default 1 8)")
    p.add_argument("--no-compile", action="store_true", help="part 1 without the compiled engine")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="reuse inductor's disk cache of compiled kernels (default: an empty one, so the compile "
                        "time shown is that of a first run on a new machine)")
    p.add_argument("--hf-experts", nargs="+", default=["grouped_mm", "batched_mm", "eager"],
                   help="transformers experts implementations to try")
    args = p.parse_args()
    if not args.warm_compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanoseek-inductor-")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    part1(args)
    if not args.skip_mtp:
        part2(args)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
