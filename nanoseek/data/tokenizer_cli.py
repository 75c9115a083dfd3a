"""`nanoseek tokenizer train|encode`: train a byte-level BPE, or show how a tokenizer splits text."""

from __future__ import annotations

import argparse
import sys

from nanoseek.data.cli import add_input_options
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on text / jsonl / parquet files")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input files or directories (.txt, .jsonl, .parquet)")
    t.add_argument("--vocab-size", type=int, required=True, help="target vocabulary size")
    t.add_argument("--out", required=True, help="output directory")
    add_input_options(t)
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("encode", help="show how a tokenizer splits some text")
    e.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
    e.add_argument("--special", action="store_true",
                   help="read control tokens written in the text (<|eos|> ...) as control tokens")
    e.add_argument("text", help="text to encode")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        tok = train_tokenizer(args.input, args.vocab_size, args.out, text_field=args.text_field,
                              text_docs=args.text_docs, progress=not args.quiet)
        print(f"saved tokenizer ({tok.vocab_size} tokens) to {args.out}")
        if tok.vocab_size < args.vocab_size:
            print(f"note: the corpus only supported {tok.vocab_size} of the requested "
                  f"{args.vocab_size} tokens", file=sys.stderr)
        return 0
    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text, special=args.special)
    print(f"{len(ids)} tokens: {ids}")
    print(" | ".join(tok.decode([i]) for i in ids))
    return 0
