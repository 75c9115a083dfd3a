"""`prepare`: documents -> token shards + manifest, crash-safe and deterministic.

Guarantees (why they matter):
- Deterministic: the same inputs and tokenizer give byte-identical shards, whatever `workers` is.
- The validation split is chosen by *document*, evenly spread over the input order
  (round(n * val_fraction) documents), so no document is cut between train and val.
- Atomic: shards are written under temporary names; the manifest is written last, through a temporary
  file and a rename. A data directory either has a manifest whose shards are complete and whose
  checksums match, or it has no manifest. A failure (full disk, Ctrl-C) removes every partial file.
- Nothing clobbered: re-running into the same `out_dir` removes only the shards its previous manifest
  listed, and refuses to start if the directory holds shard-named files that no manifest describes.
  `.partial` files left by a killed run are removed first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from nanoseek.data.encoding import choose_dtype, encode_documents
from nanoseek.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS
from nanoseek.data.readers import TEXT_DOC_MODES, check_input_files, iter_documents
from nanoseek.data.shards import ShardWriter, is_shard_name, remove_partials
from nanoseek.data.tokenizer import Tokenizer, load_tokenizer
from nanoseek.errors import UserError, require
from nanoseek.files import WriteError, fsync_dir, write_json

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB at uint16: few files, each quick to checksum
PENDING = ".manifest.pending.json"  # the new manifest while its shards are being moved into place


def is_val_doc(index: int, val_fraction: float) -> bool:
    """Document `index` goes to validation when round(k * f) steps up at k = index + 1: exactly
    round(n * f) of the first n documents, evenly spread, the first one near 1 / (2f)."""
    return math.floor((index + 1) * val_fraction + 0.5) > math.floor(index * val_fraction + 0.5)


def check_settings(val_fraction: float, shard_tokens: int, workers: int, text_docs: str) -> None:
    """Every setting checked before any file is read."""
    require(isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0,
            "--val-fraction", val_fraction, "in [0, 1)")
    require(isinstance(shard_tokens, int) and shard_tokens >= 1, "--shard-tokens", shard_tokens,
            "a positive integer")
    require(isinstance(workers, int) and workers >= 1, "--workers", workers, "at least 1")
    require(text_docs in TEXT_DOC_MODES, "--text-docs", text_docs, " / ".join(TEXT_DOC_MODES))


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
    from tqdm import tqdm  # progress bar only; keeps `import nanoseek.data` light

    workers = (os.cpu_count() or 1) if workers is None else workers
    check_settings(val_fraction, shard_tokens, workers, text_docs)
    paths = check_input_files(files)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    dtype = choose_dtype(tok.vocab_size, dtype)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    owned = _owned_shards(out) if out.is_dir() else set()
    created = [p for p in (out, *out.parents) if not p.exists()]  # removed again if prepare fails
    out.mkdir(parents=True, exist_ok=True)
    remove_partials(out, SPLITS)

    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
               desc="tokenizing", disable=not progress)
    try:
        docs = iter_documents(paths, text_field, text_docs, on_bytes=bar.update)
        for i, ids in enumerate(encode_documents(docs, tok, dtype, workers)):
            writers["val" if is_val_doc(i, val_fraction) else "train"].write_doc(ids)
            if i % 1000 == 0:
                bar.set_postfix(tokens=writers["train"].num_tokens + writers["val"].num_tokens)
        splits = {s: w.finish() for s, w in writers.items()}
    except BaseException:  # a full disk (WriteError), bad input, Ctrl-C: no partial file left behind
        _abort(writers, created)
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
        "splits": splits,
    }
    try:
        _commit(out, tok, writers, manifest, owned)
    except BaseException:
        _abort(writers, created)
        raise
    return manifest


def _abort(writers: dict, created: list[Path]) -> None:
    """Remove every partial shard, and the directories this run created if they are empty again."""
    for w in writers.values():
        w.abort()
    for directory in created:  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()


def _listed(path: Path) -> set[str] | None:
    """Shard names a (possibly damaged) manifest file lists; None if it is absent or unreadable."""
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))["splits"]
        return {sh["file"] for split in splits.values() for sh in split["shards"]
                if is_shard_name(sh["file"], SPLITS)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _owned_shards(out: Path) -> set[str]:
    """Shard files in `out` that an earlier prepare wrote: those its manifest (or the pending manifest
    of a commit that was interrupted) lists. Any other shard-named file is someone else's: refuse
    to run rather than overwrite or delete it."""
    owned: set[str] = set()
    for name in (MANIFEST, PENDING):
        owned |= _listed(out / name) or set()
    present = {p.name for p in out.iterdir() if is_shard_name(p.name, SPLITS)}
    foreign = sorted(present - owned)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"--out {out} holds shard files that no manifest there lists ({shown}); "
                        "they were not written by `nanoseek data prepare` into this directory: "
                        "move them away or choose another --out")
    return owned & present


def _commit(out: Path, tok: Tokenizer, writers: dict, manifest: dict, owned: set[str]) -> None:
    """Record the new shard list first (so an interrupted commit still knows which files are ours),
    drop the old manifest (so none describes shards being replaced), move the shards into place,
    remove the old shards the new manifest does not list, and write the manifest last."""
    try:
        write_json(out / PENDING, manifest)
        (out / MANIFEST).unlink(missing_ok=True)
        for w in writers.values():
            w.commit()
        new = {sh["file"] for split in manifest["splits"].values() for sh in split["shards"]}
        for stale in sorted(owned - new):
            (out / stale).unlink(missing_ok=True)
        tok.save(out / manifest["tokenizer_dir"])
        write_json(out / MANIFEST, manifest)
        (out / PENDING).unlink(missing_ok=True)
        fsync_dir(out)
    except OSError as e:
        raise WriteError(f"could not finish writing {out} ({e.strerror or e})") from None
