"""Load test of `nanoseek serve` on loopback: many concurrent streaming clients against one server.

    python benchmarks/serve_load.py [--clients 64] [--max-tokens 32] [--soak 1000] [--model DIR]

Starts `nanoseek serve` as a subprocess on 127.0.0.1 (a fresh tiny model with a trained tokenizer unless
--model is given) and measures, with streaming chat requests at temperature 0:

1. `--clients` clients at once: all must complete, and every output must equal offline greedy generation
   of its prompt alone (same tokens; log-probabilities within 1e-4) whatever else shared the batch;
   time to first token and inter-token latency (p50 / p99) as the clients see them.
2. The same requests one by one: total tokens / wall time, against the concurrent run (target >= 4x on CPU).
3. `--soak` more requests (short ones, `--clients` at a time): the server's RSS before and after, against
   the growth of its latent cache pool (RSS should not grow beyond the cache).

Bounded: every request has a timeout and the whole run has `--time-limit`; it exits 1 if a check fails.
Prints one JSON object with every number (docs/serving.md records a run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nanoseek  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.data.tokenizer import train_tokenizer  # noqa: E402
from nanoseek.hf import load_model_and_tokenizer, tokenizer_files  # noqa: E402
from nanoseek.inference import SamplingParams, generate  # noqa: E402
from nanoseek.serve.detokenize import TokenNames  # noqa: E402
from nanoseek.serve.engine_loop import EngineLoop, Request, RequestDone  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. 12 + 7 = 19. Think, then answer. "
        "A latent cache stores one small vector per token. Servers batch many clients at once.\n")
WORDS = TEXT.split()


def make_model(root: Path, preset_name: str) -> Path:
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 50)
    tok = train_tokenizer([corpus], 400, root / "tok", progress=False)
    torch.manual_seed(0)
    model = nanoseek.DeepseekV3ForCausalLM(preset(preset_name, vocab_size=tok.vocab_size))
    model.save_pretrained(root / "model", tokenizer_files=tokenizer_files(root / "tok"))
    return root / "model"


def prompts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (int(torch.randint(3, 25, (1,), generator=g)),),
                                                     generator=g).tolist()) for _ in range(n)]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


async def stream_chat(client: httpx.AsyncClient, url: str, name: str, text: str, max_tokens: int,
                      timeout: float) -> dict:
    """One streaming chat request; every token arrives as one chunk (logprobs=true), so the chunk times
    are the token times."""
    body = {"model": name, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "logprobs": True}
    began = time.perf_counter()
    times, tokens, logprobs, finish = [], [], [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            for choice in chunk["choices"]:
                if choice.get("logprobs"):
                    for entry in choice["logprobs"]["content"]:
                        times.append(time.perf_counter() - began)
                        tokens.append(bytes(entry["bytes"]))
                        logprobs.append(entry["logprob"])
                finish = choice.get("finish_reason") or finish
    return {"times": times, "tokens": tokens, "logprobs": logprobs, "finish": finish,
            "seconds": time.perf_counter() - began}


async def run_concurrently(url, name, texts, max_tokens, concurrency, timeout):
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(text):
            async with gate:
                return await stream_chat(client, url, name, text, max_tokens, timeout)
        began = time.perf_counter()
        results = await asyncio.gather(*(one(t) for t in texts))
        return results, time.perf_counter() - began


def engine_only(model, tok, ids: list[list[int]], max_tokens: int) -> dict:
    """The same requests through an `EngineLoop` in this process, without HTTP: what the batched decode
    itself sustains on this machine."""
    engine = EngineLoop(model, eos_token_id=tok.eos_id, decode=tok.decode, max_batch=len(ids), queue=len(ids))
    done = threading.Semaphore(0)
    tokens = [0]

    def sink(item):
        if isinstance(item, RequestDone):
            done.release()
        elif hasattr(item, "token_id"):
            tokens[0] += 1
    engine.start()
    began = time.perf_counter()
    for p in ids:
        engine.submit(Request([p], SamplingParams(max_new_tokens=max_tokens), sink))
    for _ in ids:
        done.acquire(timeout=600)
    seconds = time.perf_counter() - began
    engine.stop()
    return {"tokens": tokens[0], "seconds": round(seconds, 3), "tokens_per_second": round(tokens[0] / seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: a fresh tiny model with a trained tokenizer)")
    ap.add_argument("--preset", default="tiny", help="preset for the fresh model")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--soak", type=int, default=1000, help="requests for the memory check")
    ap.add_argument("--soak-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--speculative", action="store_true")
    ap.add_argument("--time-limit", type=float, default=900, help="seconds for the whole run")
    args = ap.parse_args()
    deadline = time.monotonic() + args.time_limit
    torch.set_num_threads(1)
    report: dict = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "clients": args.clients,
                    "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_model(Path(tmp), args.preset)
        cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(model_dir), "--port", "0",
               "--max-batch", str(args.clients), "--queue", str(max(1024, args.soak)), "--threads", str(args.threads)]
        if args.speculative:
            cmd.append("--speculative")
        report["server_command"] = " ".join(cmd[1:]).replace(str(model_dir), "MODEL")
        server = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        try:
            line = server.stderr.readline()
            match = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if not match:
                print(line + server.stderr.read(), file=sys.stderr)
                return 1
            url, name = match.group(1), model_dir.resolve().name
            return measure(args, report, url, name, model_dir, server, deadline)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()


def measure(args, report, url, name, model_dir, server, deadline) -> int:
    timeout = max(10.0, deadline - time.monotonic())
    model, tok = load_model_and_tokenizer(model_dir)
    model.eval()
    names = TokenNames(tok)
    texts = prompts(args.clients)
    ids = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    began = time.perf_counter()
    offline = [generate(model, [p], SamplingParams(max_new_tokens=args.max_tokens), eos_token_id=tok.eos_id)[0]
               for p in ids]
    report["offline_one_by_one_seconds"] = round(time.perf_counter() - began, 3)

    report["engine_only"] = engine_only(model, tok, ids, args.max_tokens)

    asyncio.run(run_concurrently(url, name, texts[:4], 4, 4, timeout))  # warm up
    results, seconds = asyncio.run(run_concurrently(url, name, texts, args.max_tokens, args.clients, timeout))
    failures = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    mismatched, lp_gap = 0, 0.0
    for r, ref in zip(results, offline):
        if "error" in r:
            continue
        if r["tokens"] != [names.bytes(t) for t in ref.token_ids] or r["finish"] != ref.finish_reason:
            mismatched += 1
        else:
            lp_gap = max([lp_gap] + [abs(a - b) for a, b in zip(r["logprobs"], ref.logprobs)])
    tokens = sum(len(r["tokens"]) for r in ok)
    ttft = [r["times"][0] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    report["concurrent"] = {
        "completed": len(ok), "failed": len(failures), "errors": failures[:3],
        "equal_to_offline_greedy": len(ok) - mismatched, "max_abs_logprob_diff": lp_gap,
        "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1),
        "ttft_p50_ms": round(1e3 * percentile(ttft, 50), 1), "ttft_p99_ms": round(1e3 * percentile(ttft, 99), 1),
        "itl_p50_ms": round(1e3 * percentile(itl, 50), 2), "itl_p99_ms": round(1e3 * percentile(itl, 99), 2)}

    results1, seconds1 = asyncio.run(run_concurrently(url, name, texts, args.max_tokens, 1, timeout))
    tokens1 = sum(len(r.get("tokens", [])) for r in results1)
    report["one_by_one"] = {"tokens": tokens1, "seconds": round(seconds1, 3),
                            "tokens_per_second": round(tokens1 / seconds1, 1),
                            "ttft_p50_ms": round(1e3 * percentile([r["times"][0] for r in results1
                                                                   if r.get("times")], 50), 1)}
    report["speedup"] = round((tokens / seconds) / (tokens1 / seconds1), 2)

    health = httpx.get(url + "/health", timeout=30).json()
    rss0 = rss_bytes(server.pid)
    soak_texts = prompts(args.soak, seed=1)
    soak, soak_seconds = asyncio.run(run_concurrently(url, name, soak_texts, args.soak_tokens, args.clients,
                                                      max(10.0, deadline - time.monotonic())))
    rss1 = rss_bytes(server.pid)
    after = httpx.get(url + "/health", timeout=30).json()
    report["soak"] = {"requests": args.soak, "completed": sum("error" not in r for r in soak),
                      "seconds": round(soak_seconds, 1), "rss_before_mb": round(rss0 / 2**20, 1),
                      "rss_after_mb": round(rss1 / 2**20, 1), "rss_growth_mb": round((rss1 - rss0) / 2**20, 1),
                      "cache_pool_before_mb": round(health["cache_bytes"] / 2**20, 1),
                      "cache_pool_after_mb": round(after["cache_bytes"] / 2**20, 1),
                      "cache_pool_max_mb": round(after["cache_max_bytes"] / 2**20, 1),
                      "cache_blocks_free_after": after["cache_blocks_free"],
                      "cache_blocks_total": after["cache_blocks_total"]}
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    checks = {
        "all concurrent clients completed": len(ok) == args.clients,
        "all outputs equal offline greedy": mismatched == 0 and not failures,
        "speedup >= 4x": report["speedup"] >= 4,
        "all soak requests completed": report["soak"]["completed"] == args.soak,
        "every cache block back in the pool": after["cache_blocks_free"] == after["cache_blocks_total"],
        # the pool may grow during the soak; anything else should not (16 MB: allocator noise)
        "RSS growth within the cache pool's growth": rss1 - rss0 <= after["cache_bytes"] - health["cache_bytes"]
        + 16 * 2**20,
    }
    for check, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}: {check}", file=sys.stderr)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
