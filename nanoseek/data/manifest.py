"""The manifest of a prepared data directory: what `prepare` writes last, what the loader trusts.

`manifest.json` names the token dtype, the tokenizer (with its sha256) and, per split ("train",
"val"), the shard files with their token counts and sha256 checksums. Every split is checksummed, so
a flipped byte in the validation shard is caught like one in the training shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nanoseek.errors import UserError
from nanoseek.files import file_sha256

MANIFEST = "manifest.json"
FORMAT = "nanoseek-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
RERUN = "re-run `nanoseek data prepare`"


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared data directory; UserError if it is absent, not ours, or malformed."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise UserError(f"data directory {data_dir} does not exist")
    if not data_dir.is_dir():
        raise UserError(f"{data_dir} is a file, not a data directory (made by `nanoseek data prepare`)")
    path = data_dir / MANIFEST
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
                        f"(expected {FORMAT_VERSION}); {RERUN}")
    _check_structure(path, manifest)
    return manifest


def _check_structure(path: Path, manifest: dict) -> None:
    """One clear error for a manifest that was edited or damaged, instead of a KeyError later."""
    for key in ("dtype", "vocab_size", "eos_id", "tokenizer_sha256", "tokenizer_dir", "splits"):
        if key not in manifest:
            raise UserError(f"{path}: the manifest has no {key!r} entry; it is damaged: {RERUN}")
    if manifest["dtype"] not in DTYPES:
        raise UserError(f"{path}: unknown token dtype {manifest['dtype']!r}; {RERUN}")
    splits = manifest["splits"]
    if not isinstance(splits, dict) or not splits:
        raise UserError(f"{path}: 'splits' must map split names to their shards; {RERUN}")
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list) or not all(_is_shard_entry(s) for s in shards):
            raise UserError(f"{path}: split {name!r} does not list its shards (file, num_tokens, "
                            f"sha256); the manifest is damaged: {RERUN}")


def _is_shard_entry(shard) -> bool:
    return (isinstance(shard, dict) and isinstance(shard.get("file"), str)
            and Path(shard["file"]).name == shard["file"] and not shard["file"].startswith(".")
            and isinstance(shard.get("num_tokens"), int) and shard["num_tokens"] >= 0
            and isinstance(shard.get("sha256"), str))


def listed_files(manifest: dict) -> set[str]:
    """The shard file names a manifest lists, over all splits."""
    return {shard["file"] for split in manifest["splits"].values() for shard in split["shards"]}


def check_shards(data_dir: str | Path, manifest: dict, split: str, verify: bool) -> None:
    """Sizes are always checked (free, and catches truncation); sha256 checksums when `verify`."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest["splits"][split]["shards"]:
        path = Path(data_dir) / shard["file"]
        if not path.is_file():
            raise UserError(f"{path}: shard listed in the manifest is missing")
        size = path.stat().st_size
        if size != shard["num_tokens"] * itemsize:
            raise UserError(f"{path}: {size} bytes, the manifest says {shard['num_tokens'] * itemsize}; "
                            f"the shard is truncated or corrupted: {RERUN}")
        if verify and file_sha256(path) != shard["sha256"]:
            raise UserError(f"{path}: checksum mismatch, the shard is corrupted: {RERUN}")


def verify_dataset(data_dir: str | Path) -> dict:
    """Check every shard of every split against the manifest; return the manifest."""
    manifest = read_manifest(data_dir)
    for split in manifest["splits"]:
        check_shards(data_dir, manifest, split, verify=True)
    return manifest
