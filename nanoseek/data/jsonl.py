"""The general JSONL-object reader: task files (`nanoseek.r1.tasks`) and SFT data (`nanoseek.r1.sft`)
both read their rows through it, so both report bad lines the same way."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from nanoseek.errors import UserError


def read_jsonl_objects(path: str | os.PathLike, label: str = "") -> Iterator[tuple[int, str, dict]]:
    """(line number, "file:line", object) for each non-blank line; one UserError naming the file and
    line for a missing file, a path that is not a file, invalid UTF-8, invalid JSON or a line that is
    not a JSON object. `label` prefixes the file-level messages (e.g. "SFT data ")."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{label}{path}: no such file")
    if not path.is_file():
        raise UserError(f"{label}{path}: not a regular file (a directory?)")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield lineno, where, row
