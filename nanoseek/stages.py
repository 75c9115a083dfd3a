"""Cached, resumable stages of a multi-step job (the demo, `nanoseek r1`).

A stage's folder holds its outputs and, last, `result.json`: the completion marker. A second run finds the
marker and reuses the result; a run stopped mid-stage finds none and runs the stage again (training stages
resume from their own checkpoints inside the folder).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from nanoseek.files import write_json

RESULT = "result.json"


class Stages:
    """`stages.run(name, fn)`: run `fn(folder)` unless `out/name/result.json` exists; results by name."""

    def __init__(self, out: Path, label: str = ""):
        self.out = Path(out)
        self.prefix = f"{label} " if label else ""
        self.results: dict[str, Any] = {}

    def run(self, name: str, fn: Callable[[Path], dict]) -> dict:
        folder = self.out / name
        done = folder / RESULT
        tag = f"[{self.prefix}{name}]"
        if done.exists():
            print(f"{tag} cached ({done})", flush=True)
            result = json.loads(done.read_text(encoding="utf-8"))
        else:
            print(f"{tag} running ...", flush=True)
            t0 = time.time()
            folder.mkdir(parents=True, exist_ok=True)
            result = fn(folder)
            result["seconds"] = time.time() - t0
            write_json(done, result, indent=1)
            print(f"{tag} done in {result['seconds']:.0f}s", flush=True)
        self.results[name] = result
        return result
