"""`nanoseek serve`: an OpenAI-compatible HTTP server for a model directory.

    nanoseek serve --model runs/r1 [--host 127.0.0.1] [--port 8000] [--speculative] [--max-batch 32] [--queue 64]

Loads the model and its tokenizer, starts the engine loop (nanoseek.serve.engine_loop) and serves the
routes of nanoseek.serve.app with uvicorn until Ctrl-C or SIGTERM, which stop taking connections, give
open requests a few seconds, stop the engine and exit 0. `--port 0` picks a free port; the line
printed at start names the address actually bound. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path

import torch
import uvicorn

from nanoseek.device import resolve_device
from nanoseek.errors import UserError, require
from nanoseek.hf import load_model_and_tokenizer
from nanoseek.serve.app import create_app
from nanoseek.serve.engine_loop import EngineLoop


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (config.json + *.safetensors + tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes the server to "
                   "the network; it has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--served-model-name", help="the model id clients send (default: the model directory's name)")
    p.add_argument("--max-batch", type=int, default=32, help="rows (requests x n) decoded together at most")
    p.add_argument("--queue", type=int, default=64, help="requests waiting beyond the batch; more get HTTP 429")
    p.add_argument("--cache-tokens", type=int, help="latent cache size in tokens, shared by all rows "
                   "(default: max-batch x the model's context)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per cache block")
    p.add_argument("--max-prefill-tokens", type=int, default=4096,
                   help="newcomers prefilled together at most (rows x longest prompt); a longer prompt goes alone")
    p.add_argument("--speculative", action="store_true",
                   help="draft one token ahead with the model's MTP module, verify with the trunk")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N], mps or auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let browser pages from ORIGIN (e.g. http://localhost:3000) call the API (CORS); repeatable")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs every request)")


def check(args: argparse.Namespace) -> None:
    require(0 <= args.port <= 65535, "--port", args.port, "in [0, 65535]")
    require(args.max_batch >= 1, "--max-batch", args.max_batch, "an integer >= 1")
    require(args.queue >= 0, "--queue", args.queue, "an integer >= 0")
    require(args.block_size >= 1, "--block-size", args.block_size, "an integer >= 1")
    require(args.max_prefill_tokens >= 1, "--max-prefill-tokens", args.max_prefill_tokens, "an integer >= 1")
    require(args.cache_tokens is None or args.cache_tokens >= args.block_size, "--cache-tokens", args.cache_tokens,
            "at least one block (--block-size)")
    require(args.threads is None or args.threads >= 1, "--threads", args.threads, "an integer >= 1")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a taken port is one clear error."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    check(args)
    device = resolve_device(args.device, "--device")
    sock = bind(args.host, args.port)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, device)
    except BaseException:
        sock.close()
        raise
    if args.speculative and not len(model.mtp):
        sock.close()
        raise UserError(f"--speculative needs an MTP module, and {args.model} has none "
                        "(num_nextn_predict_layers = 0, or a checkpoint saved by transformers)")
    name = args.served_model_name or Path(args.model).resolve().name
    engine = EngineLoop(model.eval(), eos_token_id=tokenizer.eos_id, decode=tokenizer.decode,
                        max_batch=args.max_batch, queue=args.queue, cache_tokens=args.cache_tokens,
                        block_size=args.block_size, speculative=args.speculative,
                        max_prefill_tokens=args.max_prefill_tokens)
    app = create_app(engine, tokenizer, name, tuple(args.allow_origin))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"nanoseek serve: {name} on http://{shown}:{port}/v1 (max batch {args.max_batch}, queue {args.queue}, "
          f"cache {engine.pool.capacity_blocks * engine.pool.block_size} tokens"
          f"{', speculative' if args.speculative else ''}); Ctrl-C stops", file=sys.stderr, flush=True)
    logging.getLogger("nanoseek.serve").setLevel(args.log_level.upper())
    server = QuietServer(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5, lifespan="on"))
    server.run(sockets=[sock])
    if server.signal_name:
        print(f"nanoseek serve: stopped ({server.signal_name})", file=sys.stderr, flush=True)
    return 0


class QuietServer(uvicorn.Server):
    """uvicorn re-raises the signal that stopped it once it has shut down (so Ctrl-C ends in a
    KeyboardInterrupt and SIGTERM in death by signal). The shutdown is already graceful by then; we
    return normally instead and exit 0."""
    signal_name: str | None = None

    def handle_exit(self, sig: int, frame) -> None:
        self.signal_name = signal.Signals(sig).name
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()
