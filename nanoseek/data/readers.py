"""Reading documents from text, jsonl and parquet files, for `nanoseek data prepare` and
`nanoseek tokenizer train` alike.

Formats, by suffix (a `.gz` on top of text / jsonl is decompressed on the fly):
- text (any other suffix): UTF-8; documents are blank-line separated paragraphs, single lines, or whole
  files (`text_docs`). Trailing newlines are dropped (an EOS follows each document).
- jsonl (.jsonl / .ndjson / .json): one JSON object per line; the document is `obj[text_field]`.
- parquet: the `text_field` column (needs pyarrow).

Bad input is one `UserError` naming the file and line: non-UTF-8 or binary content, a jsonl line
without the field, a file with no documents at all.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from nanoseek.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_DOC_MODES = ("paragraph", "line", "file")


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
        elif p.exists():
            raise UserError(f"{p}: exists but is neither a regular file nor a directory")
        else:
            missing.append(str(p))
    if missing:
        raise UserError(f"input file(s) not found: {', '.join(missing)}")
    return paths


def format_of(path: Path) -> str:
    """"text", "jsonl" or "parquet", from the suffix (ignoring a trailing .gz)."""
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
    """Yield the documents of each file in order (formats: see the module docstring). Blank documents
    are skipped; a file with no documents at all is an error. `on_bytes(n)` is called as input bytes
    are consumed, for progress bars."""
    if text_docs not in TEXT_DOC_MODES:
        raise UserError(f"text_docs must be 'paragraph', 'line' or 'file', got {text_docs!r}")
    for path in check_input_files(files):
        fmt = format_of(path)
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
        import pyarrow.parquet as pq  # optional dependency, imported only for parquet input
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
