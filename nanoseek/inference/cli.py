"""`nanoseek generate`: text in, text out, from a model directory (config.json + safetensors, with the
tokenizer files next to them or given by --tokenizer).

    nanoseek generate --model runs/small --prompt "Once upon a time" --max-new-tokens 64
    nanoseek generate --model runs/r1 --chat --prompt "What is 12 * 7?" --temperature 0.6 --seed 0
    nanoseek generate --model runs/small --prompt-file prompts.txt --batch-size 16

A raw prompt is encoded after an EOS token, because pretraining shards separate documents with EOS
(nanoseek.data), so "after EOS" is where the model has seen documents begin. `--chat` wraps the prompt
in the chat format instead. Prompt text is user text: control tokens typed into it (`<|eos|>`,
`<|system|>`, ...) are encoded as plain characters, never as the control ids.
One prompt is streamed; several are generated in batches of `--batch-size` (memory grows with the batch
times its longest prompt), with the same output as one big batch: row i samples with seed + i.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from nanoseek.device import resolve_device
from nanoseek.errors import UserError, require
from nanoseek.hf import load_model_and_tokenizer
from nanoseek.inference.engine import Generation
from nanoseek.inference.requests import check_prompts
from nanoseek.inference.sampling import SamplingParams


class TextStream:
    """Turns a token stream into text deltas. Decodes a short window instead of the whole text each
    time, and holds text back while it ends in an incomplete UTF-8 character (shown as U+FFFD)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


def add_sampling_arguments(p: argparse.ArgumentParser, temperature: float, top_p: float,
                           max_new_tokens: int) -> None:
    p.add_argument("--model", required=True, help="model directory (config.json + *.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model directory)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=top_p)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--seed", type=int, help="sampling seed (prompt i uses seed + i)")
    p.add_argument("--speculative", action="store_true",
                   help="draft one token ahead with the model's MTP module, verify with the trunk")
    p.add_argument("--compile", action="store_true",
                   help="decode with one compiled step (AOTInductor on CPU, needs a C++ compiler; torch.compile with "
                        "CUDA graphs on GPU): several times "
                        "faster per token after a one-off compilation of tens of seconds, so worth it for long or "
                        "many generations (docs/performance.md)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N], mps or auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch (1 is often fastest for small models, and "
                   "much steadier on a busy machine)")


def sampling_params(args: argparse.Namespace, **extra):
    """SamplingParams from the flags; an out-of-range value is one SettingError naming it."""
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, **extra)
    params.validate()
    return params


def check_speculative(args: argparse.Namespace, model) -> None:
    if args.speculative and not len(model.mtp):
        raise UserError(f"--speculative needs an MTP module, and {args.model} has none "
                        "(num_nextn_predict_layers = 0, or a checkpoint saved by transformers)")


def setup(args: argparse.Namespace, **extra):
    """Check every setting, then load: (model in eval mode, tokenizer, sampling params)."""
    require(args.threads is None or args.threads >= 1, "--threads", args.threads, "an integer >= 1")
    params = sampling_params(args, **extra)
    device = resolve_device(args.device, "--device")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, device)
    check_speculative(args, model)
    return model.eval(), tokenizer, params


# ---------------------------------------------------------------------------------------------- prompts
def checked_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode; command-line bytes that are not UTF-8 arrive as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid UTF-8 (at character {e.start})") from None
    return text


def read_prompt_file(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file ("-" = standard input), one prompt per line."""
    if path == "-":
        data, name = sys.stdin.buffer.read(), "standard input"
    else:
        file = Path(path)
        if not file.exists():
            raise UserError(f"prompt file {path} does not exist")
        if not file.is_file():
            raise UserError(f"prompt file {path} is not a regular file")
        data, name = file.read_bytes(), f"prompt file {path}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not valid UTF-8 (byte {e.start})") from None
    return [line for line in text.splitlines() if line.strip()]


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """User text -> ids, control tokens in it encoded as plain text."""
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": text}])
    return [tokenizer.eos_id] + tokenizer.encode(text)


# ---------------------------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", default=[],
                        help="prompt text; repeat for several (one prompt is streamed)")
    parser.add_argument("--prompt-file", help="UTF-8 text file with one prompt per line ('-' = stdin)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat format")
    add_sampling_arguments(parser, temperature=0.0, top_p=1.0, max_new_tokens=128)
    parser.add_argument("--batch-size", type=int, default=32,
                        help="prompts generated together (memory grows with it and the longest prompt)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no statistics on stderr")


def batch_seed(seed: int | None, start: int, n: int) -> list[int] | None:
    """Per-row seeds of the prompts start..start+n-1, as one batch of all prompts would use them."""
    return None if seed is None else [seed + start + i for i in range(n)]


def run(args: argparse.Namespace) -> int:
    require(args.batch_size >= 1, "--batch-size", args.batch_size, "an integer >= 1")
    texts = [checked_text(t, "--prompt") for t in args.prompt]
    if args.prompt_file:
        texts += read_prompt_file(args.prompt_file)
    if not texts:
        raise UserError("no prompt given: use --prompt TEXT (repeatable) or --prompt-file FILE")
    for stop in args.stop:
        checked_text(stop, "--stop")
    model, tokenizer, params = setup(args, stop_strings=tuple(args.stop))
    prompts = [encode_prompt(tokenizer, text, args.chat) for text in texts]
    check_prompts(model, prompts)
    stream = len(prompts) == 1
    text = TextStream(tokenizer.decode)
    rows, seconds = [], 0.0
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        chunk_params = replace(params, seed=batch_seed(args.seed, start, len(chunk)))
        run = Generation(model, chunk, chunk_params, eos_token_id=tokenizer.eos_id, decode=tokenizer.decode,
                         speculative=args.speculative, compile=args.compile)
        began = time.perf_counter()
        for event in run:
            if stream and event.token_id != tokenizer.eos_id:
                sys.stdout.write(text.push(event.token_id))
                sys.stdout.flush()
        seconds += time.perf_counter() - began
        if not stream:
            for i, row in enumerate(run.completions, start=start):
                body = tokenizer.decode([t for t in row.token_ids if t != tokenizer.eos_id])
                sys.stdout.write(f"=== {i}: {texts[i]}\n{body}\n")
            sys.stdout.flush()
        rows += run.completions
    if stream:
        sys.stdout.write(text.flush() + "\n")
    if not args.quiet:
        print(summary(rows, seconds), file=sys.stderr)
    return 0


def summary(rows, seconds: float) -> str:
    """'[N tokens in Xs, Y tokens/s, MTP acceptance Z%]' for the stderr footer."""
    n = sum(len(r.token_ids) for r in rows)
    line = f"[{n} tokens in {seconds:.2f}s, {n / max(seconds, 1e-9):.1f} tokens/s"
    drafted = sum(r.drafted for r in rows)
    if drafted:
        line += f", MTP acceptance {sum(r.accepted for r in rows) / drafted:.0%}"
    return line + "]"
