"""`nanoseek generate`: text in, text out, from a model directory (config.json + safetensors, with the
tokenizer files next to them or given by --tokenizer).

    nanoseek generate --model runs/small --prompt "Once upon a time" --max-new-tokens 64
    nanoseek generate --model runs/r1 --chat --prompt "What is 12 * 7?" --temperature 0.6 --seed 0

A raw prompt is encoded after an EOS token, because pretraining shards separate documents with EOS
(nanoseek.data), so "after EOS" is where the model has seen documents begin. `--chat` wraps the prompt
in the tokenizer's chat template instead. One prompt is streamed; several are generated as a batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nanoseek.errors import UserError


# ---------------------------------------------------------------------------------------------- loading
def load_model_and_tokenizer(model_dir: str, tokenizer_dir: str | None = None, dtype: str = "float32",
                             device: str = "cpu"):
    """Model and tokenizer for inference, with one clear error for each way the pair can be unusable.
    The tokenizer and config are checked before the weights are read."""
    import nanoseek
    from nanoseek.config import ModelConfig
    from nanoseek.data.tokenizer import load_tokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    if not (path / "config.json").is_file():
        raise UserError(f"{model_dir} has no config.json: not a model directory")
    cfg = ModelConfig.from_json(path)
    tok_path = Path(tokenizer_dir) if tokenizer_dir else path
    if not (tok_path / "tokenizer.json").is_file() and not tok_path.is_file():
        hint = "" if tokenizer_dir else "; pass --tokenizer DIR"
        raise UserError(f"no tokenizer.json in {tok_path}{hint}")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                        f"{cfg.vocab_size}: they do not belong together")
    model = nanoseek.from_pretrained(path, dtype=dtype, device=device).eval()
    return model, tokenizer


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
    p.add_argument("--seed", type=int, help="sampling seed (row i of a batch uses seed + i)")
    p.add_argument("--speculative", action="store_true",
                   help="draft one token ahead with the model's MTP module, verify with the trunk")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads for torch (1 is often fastest for small models, and "
                   "much steadier on a busy machine)")


def sampling_params(args: argparse.Namespace, **extra):
    from nanoseek.inference.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, **extra)
    try:
        params.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    return params


def check_speculative(args: argparse.Namespace, model) -> None:
    if args.speculative and not len(model.mtp):
        raise UserError(f"--speculative needs an MTP module, and {args.model} has none "
                        "(num_nextn_predict_layers = 0, or a checkpoint saved by transformers)")


# ---------------------------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch (streamed when there is one)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    add_sampling_arguments(parser, temperature=0.0, top_p=1.0, max_new_tokens=128)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no statistics on stderr")


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": text}])
    return [tokenizer.eos_id] + tokenizer.encode(text)


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def run(args: argparse.Namespace) -> int:
    from nanoseek.inference.engine import Generation, check_prompts

    apply_threads(args)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, args.device)
    check_speculative(args, model)
    params = sampling_params(args, stop_strings=tuple(args.stop))
    prompts = [encode_prompt(tokenizer, text, args.chat) for text in args.prompt]
    check_prompts(model, prompts)
    run = Generation(model, prompts, params, eos_token_id=tokenizer.eos_id, decode=tokenizer.decode,
                     speculative=args.speculative)
    text = TextStream(tokenizer.decode)
    start = time.perf_counter()
    for event in run:
        if len(prompts) == 1 and event.token_id != tokenizer.eos_id:
            sys.stdout.write(text.push(event.token_id))
            sys.stdout.flush()
    seconds = time.perf_counter() - start
    if len(prompts) == 1:
        sys.stdout.write(text.flush() + "\n")
    else:
        for i, (prompt, row) in enumerate(zip(args.prompt, run.completions)):
            body = tokenizer.decode([t for t in row.token_ids if t != tokenizer.eos_id])
            sys.stdout.write(f"=== {i}: {prompt}\n{body}\n")
    if not args.quiet:
        print(summary(run.completions, seconds), file=sys.stderr)
    return 0


def summary(rows, seconds: float) -> str:
    """'[N tokens in Xs, Y tokens/s, MTP acceptance Z%]' for the stderr footer."""
    n = sum(len(r.token_ids) for r in rows)
    line = f"[{n} tokens in {seconds:.2f}s, {n / max(seconds, 1e-9):.1f} tokens/s"
    drafted = sum(r.drafted for r in rows)
    if drafted:
        line += f", MTP acceptance {sum(r.accepted for r in rows) / drafted:.0%}"
    return line + "]"
