"""Pretraining data: read documents, tokenize them into shards, and feed packed batches to training.

`nanoseek data prepare --input FILES... --tokenizer DIR --out DIR` streams documents from text / jsonl /
parquet files, tokenizes them on all cores, appends `<|eos|>` after each document, and writes flat token
shards (`train_000000.bin`, `val_000000.bin`, ...: raw little-endian uint16 when the vocabulary fits,
else uint32) plus `manifest.json` and a copy of the tokenizer in `DIR/tokenizer/`.

One job per module (imports point down this list; nothing here imports train, inference or r1):

- `readers`      documents from text / jsonl / parquet files (`iter_documents`, `check_input_files`)
- `jsonl`        the general JSONL-object reader used by task files and SFT data
- `synthetic`    the built-in English-and-arithmetic corpus (`synthetic_corpus`, `write_corpus`)
- `tokenizer`    the byte-level BPE `Tokenizer`, its special tokens and chat format
- `encoding`     documents -> ids + EOS on all cores (`encode_documents`, `choose_dtype`)
- `shards`       `ShardWriter`: shard files under temporary names, hashed as written
- `manifest`     `manifest.json`: reading, structure checks, checksums (`read_manifest`, `verify_dataset`)
- `preparation`  `prepare()`: the whole pipeline, crash-safe, never clobbering other files
- `shuffle`      per-epoch seeded orders (`EpochOrder`, `epoch_permutation`)
- `loader`       `TokenLoader`: packed, shuffled, resumable batches
- `cli`, `tokenizer_cli`   the `nanoseek data` and `nanoseek tokenizer` commands

The names below are re-exported for convenience.
"""

from nanoseek.data.jsonl import read_jsonl_objects
from nanoseek.data.loader import TokenLoader
from nanoseek.data.manifest import read_manifest, verify_dataset
from nanoseek.data.preparation import prepare
from nanoseek.data.readers import check_input_files, iter_documents
from nanoseek.data.shuffle import EpochOrder, epoch_permutation
from nanoseek.data.synthetic import synthetic_corpus, write_corpus
from nanoseek.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "EpochOrder", "TokenLoader", "Tokenizer", "check_input_files", "epoch_permutation",
    "iter_documents", "load_tokenizer", "prepare", "read_jsonl_objects", "read_manifest",
    "synthetic_corpus", "train_tokenizer", "verify_dataset", "write_corpus",
]
