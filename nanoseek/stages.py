"""Cached, resumable stages of a multi-step job (the demo, `nanoseek r1`).

A stage's folder holds its outputs and, last, `result.json`: the completion marker. A second run finds the
marker and reuses the result; a run stopped mid-stage finds none and runs the stage again (training stages
resume from their own checkpoints inside the folder).

Each result records the stage's wall-clock `seconds`, its process `cpu_seconds` (with one torch thread about
the wall time the stage would take on an idle machine) and the 1-minute `load_average` when it ended, so a
time measured on a busy machine says so.
"""

from __future__ import annotations

import json
import os
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

    def run(self, name: str, fn: Callable[[Path], dict], current: Callable[[dict], bool] | None = None) -> dict:
        """`current(result)` False: the cached result was written by an older version that lacks what this one
        needs, so the stage runs again."""
        folder = self.out / name
        done = folder / RESULT
        tag = f"[{self.prefix}{name}]"
        result = json.loads(done.read_text(encoding="utf-8")) if done.exists() else None
        if result is not None and current is not None and not current(result):
            print(f"{tag} cached result is from an older nanoseek: running again", flush=True)
            result = None
        if result is not None:
            print(f"{tag} cached ({done})", flush=True)
        else:
            print(f"{tag} running ...", flush=True)
            t0, cpu0 = time.time(), time.process_time()
            folder.mkdir(parents=True, exist_ok=True)
            result = fn(folder)
            result["seconds"] = time.time() - t0
            result["cpu_seconds"] = time.process_time() - cpu0
            result["load_average"] = os.getloadavg()[0]
            write_json(done, result, indent=1)
            print(f"{tag} done in {result['seconds']:.0f}s ({result['cpu_seconds']:.0f} CPU s, load average "
                  f"{result['load_average']:.1f})", flush=True)
        self.results[name] = result
        return result
