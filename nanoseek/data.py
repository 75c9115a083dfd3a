"""Pretraining data: read documents, tokenize them into shards, and feed packed batches to training.

`nanoseek data prepare --input FILES... --tokenizer DIR --out DIR` streams documents from text / jsonl /
parquet files (optionally .gz-compressed text / jsonl), tokenizes them on all cores, appends `<|eos|>`
after each document, and writes flat token shards (`train_000000.bin`, `val_000000.bin`, ...: raw
little-endian uint16 when the vocabulary fits, else uint32) plus `manifest.json` and a copy of the
tokenizer in `DIR/tokenizer/`.

Guarantees (why they matter):
- Deterministic: the same inputs and tokenizer give byte-identical shards, whatever `--workers` is.
- The validation split is chosen by *document*, evenly spread over the input order
  (round(n * val_fraction) documents), so no document is cut between train and val.
- Atomic: shards are written under temporary names; the manifest is written last, through a temporary
  file and a rename. A data directory either has a manifest whose shards are complete and whose
  checksums match, or it has no manifest. `TokenLoader` refuses a directory without one.

`TokenLoader` concatenates a split's shards into one token stream, cuts it into non-overlapping
`seq_len` windows (documents are packed, separated by EOS), shuffles the window order per epoch from
`seed`, and yields `LongTensor[batch_size, seq_len]`. Its `state_dict()` is one counter, so a resumed
run continues at exactly the next window.

`synthetic_corpus(n_docs, seed)` makes a small deterministic English-and-arithmetic corpus for tests
and the demo, with no downloads.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from nanoseek.errors import UserError
from nanoseek.tokenizer import Tokenizer, add_input_options, load_tokenizer

MANIFEST = "manifest.json"
FORMAT = "nanoseek-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB at uint16: few files, each quick to checksum
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


# ==== reading documents ===========================================================================
def check_input_files(files: Sequence[str | Path]) -> list[Path]:
    """Expand directories (recursively, sorted, hidden files skipped) and fail early, naming every
    missing path, rather than after an hour of tokenizing the files that did exist."""
    if not files:
        raise UserError("no input files given")
    paths: list[Path] = []
    missing: list[str] = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            if not found:
                raise UserError(f"{p}: directory contains no files")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            missing.append(str(p))
    if missing:
        raise UserError(f"input file(s) not found: {', '.join(missing)}")
    return paths


def _format_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".parquet":
        return "parquet"
    return "jsonl" if last in JSONL_SUFFIXES else "text"


def iter_documents(
    files: Sequence[str | Path],
    text_field: str = "text",
    text_docs: str = "paragraph",
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Yield the documents of each file in order.

    - text (any other suffix): UTF-8; documents are blank-line separated paragraphs, single lines,
      or whole files (`text_docs`). Trailing newlines are dropped (an EOS follows each document).
    - jsonl (.jsonl / .ndjson / .json): one JSON object per line; the document is `obj[text_field]`.
    - parquet: the `text_field` column (needs pyarrow).
    - `.gz` on top of text / jsonl is decompressed on the fly.
    Blank documents are skipped; a file with no documents at all is an error, as are non-UTF-8 or
    binary content and jsonl lines without the field (the message names the file and line).
    `on_bytes(n)` is called as input bytes are consumed, for progress bars.
    """
    if text_docs not in ("paragraph", "line", "file"):
        raise UserError(f"text_docs must be 'paragraph', 'line' or 'file', got {text_docs!r}")
    for path in check_input_files(files):
        fmt = _format_of(path)
        size = path.stat().st_size
        counted = [0]

        def count(n: int, _size=size, _counted=counted) -> None:
            if on_bytes is not None and _counted[0] + n <= _size:
                _counted[0] += n
                on_bytes(n)

        if fmt == "parquet":
            docs = _parquet_docs(path, text_field)
        elif fmt == "jsonl":
            docs = _jsonl_docs(path, text_field, count)
        else:
            docs = _text_docs(path, text_docs, count)
        n_docs = 0
        for doc in docs:
            n_docs += 1
            yield doc
        if n_docs == 0:
            raise UserError(f"{path}: contains no text (empty file?)")
        if on_bytes is not None and size > counted[0]:
            on_bytes(size - counted[0])


def _lines(path: Path, count: Callable[[int], None]) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) with '\\r\\n' normalised to '\\n'. Reads bytes and decodes each line
    itself so a bad file is reported with its line number, and NUL bytes (binary files, which can be
    valid UTF-8) are rejected."""
    compressed = path.suffix.lower() == ".gz"
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not compressed:
                    count(len(raw))
                if b"\x00" in raw:
                    raise UserError(f"{path}: line {lineno} contains NUL bytes; this looks like a "
                                    "binary file, not text")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason} at byte "
                                    f"{e.start} of the line); is this a binary file?") from None
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                yield lineno, line.replace("\r\n", "\n")
    except (OSError, EOFError) as e:  # unreadable file, corrupt gzip
        raise UserError(f"{path}: cannot read ({e})") from None


def _text_docs(path: Path, mode: str, count: Callable[[int], None]) -> Iterator[str]:
    buf: list[str] = []
    for _, line in _lines(path, count):
        if mode == "line":
            if line.strip():
                yield line.rstrip("\n")
        elif mode == "paragraph" and not line.strip():
            if buf:
                yield "".join(buf).rstrip("\n")
                buf = []
        else:
            buf.append(line)
    doc = "".join(buf).rstrip("\n")
    if doc.strip():
        yield doc


def _jsonl_docs(path: Path, field: str, count: Callable[[int], None]) -> Iterator[str]:
    for lineno, line in _lines(path, count):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or field not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"{path}: line {lineno} has no {field!r} field (found: {keys}); "
                            "choose the field with --text-field")
        text = obj[field]
        if not isinstance(text, str):
            raise UserError(f"{path}: line {lineno}: field {field!r} is {type(text).__name__}, "
                            "expected a string")
        if text.strip():
            yield text


def _parquet_docs(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow.ArrowInvalid and friends
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(f"{path}: no {field!r} column (found: {', '.join(names)}); "
                        "choose the column with --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"{path}: row {row}: column {field!r} holds {type(text).__name__}, "
                                "expected strings")
            if text.strip():
                yield text


# ==== synthetic corpus ============================================================================
_NAMES = ["Alice", "Bob", "Tom", "Mia", "Sam", "Lily", "Max", "Emma", "Leo", "Zoe", "Ben", "Ada"]
_ANIMALS = ["cat", "dog", "bird", "fox", "horse", "rabbit", "fish", "mouse", "duck", "bear"]
_ADJECTIVES = ["small", "big", "red", "blue", "happy", "quiet", "fast", "old", "young", "green"]
_OBJECTS = ["ball", "book", "apple", "box", "cup", "hat", "kite", "stone", "letter", "flower"]
_VERBS = [("sees", "see"), ("likes", "like"), ("finds", "find"), ("takes", "take"),
          ("holds", "hold"), ("wants", "want"), ("draws", "draw"), ("moves", "move")]
_INTRANSITIVE = ["runs", "sleeps", "plays", "sings", "waits", "jumps", "rests", "hides"]
_PLACES = ["in the park", "at home", "by the river", "in the garden", "at school", "near the house"]
_TIMES = ["In the morning", "At night", "After lunch", "On Sunday", "Every day", "Later"]


def _sentence(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    adj, obj, place = rng.choice(_ADJECTIVES), rng.choice(_OBJECTS), rng.choice(_PLACES)
    verb, verb_plural = rng.choice(_VERBS)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{name} {verb} the {adj} {obj} {place}."
    if kind == 1:
        return f"The {adj} {rng.choice(_ANIMALS)} {rng.choice(_INTRANSITIVE)} {place}."
    if kind == 2:
        return f"{rng.choice(_TIMES)}, {name} and {other} {verb_plural} a {adj} {obj}."
    n, m = rng.randint(1, 9), rng.randint(1, 9)
    return f"{name} has {n} {obj}s and gets {m} more, so {name} has {n + m} {obj}s."


def _fact(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} = {a - b}."
    if op == "*":
        a, b = a % 13, b % 13
        return f"{a} * {b} = {a * b}."
    return f"{a} + {b} = {a + b}."


def synthetic_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """`n_docs` one-line documents: simple English sentences, some with arithmetic word problems,
    and lists of arithmetic facts ("12 + 7 = 19."). Deterministic in `seed`; no newlines inside a
    document, so it round-trips through text files in any `text_docs` mode."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        make = _fact if rng.random() < 0.3 else _sentence
        docs.append(" ".join(make(rng) for _ in range(rng.randint(2, 6))))
    return docs


# ==== tokenizing ==================================================================================
def choose_dtype(vocab_size: int, dtype: str = "auto") -> str:
    """uint16 halves disk and memory traffic, and holds ids up to 65535."""
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in DTYPES:
        raise UserError(f"dtype must be auto, uint16 or uint32, got {dtype!r}")
    limit = np.iinfo(DTYPES[dtype]).max + 1
    if vocab_size > limit:
        raise UserError(f"the tokenizer has {vocab_size} tokens, which do not fit {dtype} "
                        f"(at most {limit}); use --dtype uint32 or auto")
    return dtype


def _encode_texts(backend, eos_id: int, dtype: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a chunk of documents, each followed by EOS: (flat ids, per-document lengths). One flat
    array pickles far faster than a list of lists when coming back from a worker."""
    encs = backend.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int64, count=len(encs))
    flat = np.empty(int(lengths.sum()), dtype=DTYPES[dtype])
    pos = 0
    for e, n in zip(encs, lengths):
        flat[pos:pos + n - 1] = e.ids
        flat[pos + n - 1] = eos_id
        pos += n
    return flat, lengths


_WORKER: tuple | None = None


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str) -> None:
    """Each worker builds its own tokenizer once; the parent handles Ctrl-C, and the Rust thread
    pool stays off so N workers use N cores, not N x N threads."""
    global _WORKER
    import tokenizers

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (tokenizers.Tokenizer.from_str(tokenizer_json), eos_id, dtype)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_texts(*_WORKER, texts)


def _chunks(docs: Iterable[str], max_docs: int = 256, max_chars: int = 1 << 20) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def encode_documents(docs: Iterable[str], tok: Tokenizer, dtype: str, workers: int) -> Iterator[np.ndarray]:
    """Yield each document's ids (+ EOS) in input order. With workers > 1 chunks go to a process pool,
    at most 2 x workers in flight so memory stays bounded however large the corpus is (Pool.imap
    would read the whole input ahead). `spawn` avoids forking a process that runs Rust threads."""
    if workers <= 1:
        results = (_encode_texts(tok.backend, tok.eos_id, dtype, c) for c in _chunks(docs))
        yield from _split_docs(results)
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(workers, initializer=_init_worker,
                    initargs=(tok.backend.to_str(), tok.eos_id, dtype))
    try:
        pending: deque = deque()
        for chunk in _chunks(docs):
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield from _split_docs([pending.popleft().get()])
        while pending:
            yield from _split_docs([pending.popleft().get()])
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _split_docs(results: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
    for flat, lengths in results:
        yield from np.split(flat, np.cumsum(lengths)[:-1])


def is_val_doc(index: int, val_fraction: float) -> bool:
    """Document `index` goes to validation when round(k * f) steps up at k = index + 1: exactly
    round(n * f) of the first n documents, evenly spread, the first one near 1 / (2f)."""
    return math.floor((index + 1) * val_fraction + 0.5) > math.floor(index * val_fraction + 0.5)


# ==== writing shards ==============================================================================
class _ShardWriter:
    """Appends token ids to `{split}_{i:06d}.bin` shards of `shard_tokens` tokens each, hashing as it
    goes. Files are written under temporary names; `commit()` gives them their final names."""

    def __init__(self, out: Path, split: str, dtype: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self._disk_dtype = np.dtype(dtype).newbyteorder("<")
        self.shards: list[dict] = []  # {"file", "num_tokens", "sha256"} + "_tmp" until committed
        self.num_tokens = 0
        self.num_docs = 0
        self._file = None
        self._hash = None

    def write_doc(self, ids: np.ndarray) -> None:
        self.num_docs += 1
        while len(ids):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self.shards[-1]["num_tokens"]
            piece, ids = ids[:room], ids[room:]
            data = np.ascontiguousarray(piece, dtype=self._disk_dtype).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self.shards[-1]["num_tokens"] += len(piece)
            self.num_tokens += len(piece)
            if self.shards[-1]["num_tokens"] == self.shard_tokens:
                self._close()

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        tmp = self.out / f".{name}.{os.getpid()}.partial"
        self.shards.append({"file": name, "num_tokens": 0, "sha256": "", "_tmp": tmp})
        self._file = open(tmp, "wb")
        self._hash = hashlib.sha256()

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._file = None

    def commit(self) -> dict:
        """Rename the finished shards into place; return this split's manifest entry."""
        self._close()
        for shard in self.shards:
            os.replace(shard.pop("_tmp"), self.out / shard["file"])
        return {"num_tokens": self.num_tokens, "num_docs": self.num_docs, "shards": self.shards}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for shard in self.shards:
            tmp = shard.get("_tmp")
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(
    files: Sequence[str | Path],
    tokenizer: str | Path | Tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.01,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    text_field: str = "text",
    text_docs: str = "paragraph",
    dtype: str = "auto",
    progress: bool = True,
) -> dict:
    """Tokenize `files` into shards in `out_dir` and return the manifest (also saved as
    `out_dir/manifest.json`). `workers=None` uses every core. See the module docstring."""
    from tqdm import tqdm

    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be positive, got {shard_tokens}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    paths = check_input_files(files)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    dtype = choose_dtype(tok.vocab_size, dtype)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
               desc="tokenizing", disable=not progress)
    try:
        docs = iter_documents(paths, text_field, text_docs, on_bytes=bar.update)
        for i, ids in enumerate(encode_documents(docs, tok, dtype, workers)):
            writers["val" if is_val_doc(i, val_fraction) else "train"].write_doc(ids)
            if i % 1000 == 0:
                bar.set_postfix(tokens=writers["train"].num_tokens + writers["val"].num_tokens)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "tokenizer_sha256": tok.sha256,
        "tokenizer_dir": "tokenizer",
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "text_field": text_field,
        "text_docs": text_docs,
        "sources": [str(p) for p in paths],
    }
    return _commit(out, tok, writers, manifest)


def _commit(out: Path, tok: Tokenizer, writers: dict, manifest: dict) -> dict:
    """Drop the old manifest first, so no moment exists where a manifest describes shards that are
    being replaced; then move shards into place, remove stale ones, write the manifest last."""
    (out / MANIFEST).unlink(missing_ok=True)
    manifest["splits"] = {s: w.commit() for s, w in writers.items()}
    keep = {sh["file"] for split in manifest["splits"].values() for sh in split["shards"]}
    for s in SPLITS:
        for stale in out.glob(f"{s}_*.bin"):
            if stale.name not in keep:
                stale.unlink()
    tok.save(out / manifest["tokenizer_dir"])
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


# ==== reading shards ==============================================================================
def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared data directory; UserError if it is absent or not ours."""
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).is_dir():
        raise UserError(f"data directory {data_dir} does not exist")
    if not path.is_file():
        raise UserError(f"{data_dir} has no {MANIFEST}: not a prepared data directory, or "
                        "`nanoseek data prepare` did not finish; run it (again)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a nanoseek token manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: manifest version {manifest.get('version')} is not supported "
                        f"(expected {FORMAT_VERSION}); re-run `nanoseek data prepare`")
    return manifest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def _check_shards(data_dir: Path, manifest: dict, split: str, verify: bool) -> None:
    """Sizes are always checked (free, and catches truncation); sha256 checksums when `verify`."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest["splits"][split]["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            raise UserError(f"{path}: shard listed in the manifest is missing")
        size = path.stat().st_size
        if size != shard["num_tokens"] * itemsize:
            raise UserError(f"{path}: {size} bytes, the manifest says {shard['num_tokens'] * itemsize}; "
                            "the shard is truncated or corrupted: re-run `nanoseek data prepare`")
        if verify and _file_sha256(path) != shard["sha256"]:
            raise UserError(f"{path}: checksum mismatch, the shard is corrupted: "
                            "re-run `nanoseek data prepare`")


def verify_dataset(data_dir: str | Path) -> dict:
    """Check every shard of every split against the manifest; return the manifest."""
    manifest = read_manifest(data_dir)
    for split in manifest["splits"]:
        _check_shards(Path(data_dir), manifest, split, verify=True)
    return manifest


class TokenLoader:
    """Packed, shuffled, resumable batches from a prepared data directory.

    The split's shards form one token stream, cut into `num_windows = num_tokens // seq_len`
    non-overlapping windows (the tail shorter than a window is unused). Windows are visited in a
    fresh permutation each epoch, drawn from (seed, epoch), so the order depends on nothing else.
    Each step takes the next `batch_size * world_size` windows of that endless sequence (a batch may
    straddle two epochs) and this rank keeps its `batch_size` of them. Batches are
    `LongTensor[batch_size, seq_len]`; the model shifts labels itself.

    `state_dict()` is essentially the number of windows consumed, so resuming, even with another
    batch size or world size, continues exactly where training stopped. With `epochs` set iteration
    stops after that many passes, and the last batch may be smaller.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        seq_len: int = 1024,
        batch_size: int = 8,
        seed: int = 0,
        shuffle: bool = True,
        verify: bool = True,
        epochs: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        device=None,
    ):
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        if split not in self.manifest["splits"]:
            raise UserError(f"unknown split {split!r}; {data_dir} has {list(self.manifest['splits'])}")
        _check_shards(self.data_dir, self.manifest, split, verify)
        self.split, self.seq_len, self.batch_size, self.seed = split, seq_len, batch_size, seed
        self.shuffle, self.epochs, self.rank, self.world_size = shuffle, epochs, rank, world_size
        self.device = device
        self._open_shards()
        self.num_windows = self.num_tokens // seq_len
        if self.num_windows == 0:
            hint = " (raise --val-fraction)" if split == "val" else ""
            raise UserError(f"the {split} split of {data_dir} has {self.num_tokens} tokens, fewer than "
                            f"one sequence of {seq_len}{hint}")
        self.consumed = 0  # windows taken from the endless shuffled sequence, over all ranks
        self._perm_epoch, self._perm = -1, None

    def _open_shards(self) -> None:
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        shards = [s for s in self.manifest["splits"][self.split]["shards"] if s["num_tokens"]]
        self._maps = [np.memmap(self.data_dir / s["file"], dtype=dtype, mode="r") for s in shards]
        self._starts = np.cumsum([0] + [s["num_tokens"] for s in shards])
        self.num_tokens = int(self._starts[-1])

    # ---- facts about the data --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer_sha256"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.data_dir / self.manifest["tokenizer_dir"]

    @property
    def epoch(self) -> int:
        return self.consumed // self.num_windows

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_windows / (self.batch_size * self.world_size))

    # ---- batches ---------------------------------------------------------------------------------
    def _window_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_windows)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def _read(self, start: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + len(out)) of the split's stream, across shard ends, into out."""
        pos, filled = start, 0
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while filled < len(out):
            begin = pos - self._starts[shard]
            piece = self._maps[shard][begin:begin + len(out) - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            pos += len(piece)
            shard += 1

    def next_batch(self):
        """The next `LongTensor[batch_size, seq_len]`; StopIteration once `epochs` are done."""
        import torch

        step = self.batch_size * self.world_size
        end = self.consumed + step
        if self.epochs is not None:
            end = min(end, self.epochs * self.num_windows)
        mine = range(self.consumed + self.rank * self.batch_size,
                     min(self.consumed + (self.rank + 1) * self.batch_size, end))
        if len(mine) == 0:
            raise StopIteration
        batch = np.empty((len(mine), self.seq_len), dtype=np.int64)
        for row, position in enumerate(mine):
            self._read(self._window_index(position) * self.seq_len, batch[row])
        self.consumed = self.consumed + step if end - self.consumed == step else end
        tensor = torch.from_numpy(batch)
        if self.device is not None:
            device = torch.device(self.device)
            if device.type == "cuda":
                tensor = tensor.pin_memory()
            tensor = tensor.to(device, non_blocking=True)
        return tensor

    def __iter__(self):
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    # ---- resuming --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_tokens": self.num_tokens,
            "tokenizer_sha256": self.tokenizer_sha256,
            "consumed_windows": self.consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved loader stopped. The data and the ordering settings must match,
        or the position would point at different tokens; a mismatch is a UserError naming it."""
        for key in ("split", "seq_len", "seed", "shuffle", "num_tokens", "tokenizer_sha256"):
            if state.get(key) != getattr(self, key):
                raise UserError(f"cannot resume the data loader: {key} was {state.get(key)!r} when "
                                f"saved, now {getattr(self, key)!r}")
        self.consumed = int(state["consumed_windows"])

    def __repr__(self) -> str:
        return (f"TokenLoader({str(self.data_dir)!r}, split={self.split!r}, tokens={self.num_tokens}, "
                f"seq_len={self.seq_len}, batch_size={self.batch_size}, epoch={self.epoch})")


# ==== CLI =========================================================================================
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


def write_corpus(docs: Iterable[str], path: str | Path) -> Path:
    """Save documents as jsonl (field "text") if the name ends in .jsonl, else as blank-line separated
    paragraphs, the formats `iter_documents` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n" if path.suffix == ".jsonl" else doc + "\n\n")
    return path


def _summary(manifest: dict, out: str) -> str:
    parts = [f"{s}: {v['num_tokens']:,} tokens, {v['num_docs']:,} docs, {len(v['shards'])} shard(s)"
             for s, v in manifest["splits"].items()]
    return f"wrote {out} ({manifest['dtype']}, vocab {manifest['vocab_size']}): " + "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        manifest = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
                           shard_tokens=args.shard_tokens, workers=args.workers,
                           text_field=args.text_field, text_docs=args.text_docs, dtype=args.dtype,
                           progress=not args.quiet)
        print(_summary(manifest, args.out))
        if args.val_fraction > 0 and manifest["splits"]["val"]["num_docs"] == 0:
            print("warning: too few documents for any validation data; raise --val-fraction",
                  file=sys.stderr)
        return 0
    if args.action == "synthetic":
        if args.n_docs < 1:
            raise UserError(f"--n-docs must be positive, got {args.n_docs}")
        path = write_corpus(synthetic_corpus(args.n_docs, args.seed), args.out)
        print(f"wrote {args.n_docs} documents to {path}")
        return 0
    manifest = verify_dataset(args.data_dir)
    print(f"ok: {_summary(manifest, args.data_dir)}")
    return 0
