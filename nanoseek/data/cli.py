"""`nanoseek data prepare|synthetic|verify`: token shards from text / jsonl / parquet files."""

from __future__ import annotations

import argparse

from nanoseek.data.manifest import verify_dataset
from nanoseek.data.preparation import DEFAULT_SHARD_TOKENS, prepare
from nanoseek.data.readers import TEXT_DOC_MODES
from nanoseek.data.synthetic import synthetic_corpus, write_corpus
from nanoseek.errors import require, warn


def add_input_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `nanoseek data prepare` and `nanoseek tokenizer train`."""
    p.add_argument("--text-field", default="text", help="jsonl / parquet field holding the text")
    p.add_argument("--text-docs", default="paragraph", choices=TEXT_DOC_MODES,
                   help="how plain-text files split into documents: blank-line separated paragraphs "
                        "(default), one per line, or one per file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("prepare", help="tokenize text / jsonl / parquet files into token shards")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input files or directories (.txt, .jsonl, .parquet; .gz for text / jsonl)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents held out for validation (default 0.01)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:_})")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"),
                   help="token storage type (auto: uint16 when the vocabulary fits)")
    add_input_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("synthetic", help="write the built-in synthetic corpus (no download needed)")
    s.add_argument("--out", required=True, help="output file: .jsonl (field 'text') or plain text")
    s.add_argument("--n-docs", type=int, default=10_000, help="number of documents")
    s.add_argument("--seed", type=int, default=0)

    v = sub.add_parser("verify", help="check a data directory's shards against its manifest")
    v.add_argument("data_dir")


def summary(manifest: dict, out: str) -> str:
    parts = [f"{s}: {v['num_tokens']:,} tokens, {v['num_docs']:,} docs, {len(v['shards'])} shard(s)"
             for s, v in manifest["splits"].items()]
    return f"wrote {out} ({manifest['dtype']}, vocab {manifest['vocab_size']}): " + "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        manifest = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
                           shard_tokens=args.shard_tokens, workers=args.workers,
                           text_field=args.text_field, text_docs=args.text_docs, dtype=args.dtype,
                           progress=not args.quiet)
        print(summary(manifest, args.out))
        if args.val_fraction > 0 and manifest["splits"]["val"]["num_docs"] == 0:
            warn("too few documents for any validation data; raise --val-fraction")
        return 0
    if args.action == "synthetic":
        require(args.n_docs >= 1, "--n-docs", args.n_docs, "a positive integer")
        path = write_corpus(synthetic_corpus(args.n_docs, args.seed), args.out)
        print(f"wrote {args.n_docs} documents to {path}")
        return 0
    manifest = verify_dataset(args.data_dir)
    print(f"ok: {summary(manifest, args.data_dir)}")
    return 0
