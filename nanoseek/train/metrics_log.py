"""The metrics log of a run: one JSON object per line in metrics.jsonl, mirrored to TensorBoard when installed.

On resume the log is cut back to the checkpoint's step first, so steps that ran after the checkpoint and
are now repeated do not appear twice (TensorBoard: `purge_step`, which hides those steps' events)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nanoseek.files import write_lines

LOG_NAME = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        """resume_step=None starts a new log; otherwise rows up to that step are kept and new rows appended."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / LOG_NAME
        if resume_step is None:
            write_lines(self.path, [])
        else:
            truncate_log(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # on resume TensorBoard hides the events of the steps after the checkpoint (they are redone)
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
            except Exception:  # tensorboard not installed: JSONL only
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: plain_value(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def plain_value(v: Any) -> Any:
    """A tensor or array as a JSON value (scalars as numbers)."""
    if hasattr(v, "item") and getattr(v, "numel", lambda: 2)() == 1:
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl; a torn or garbled line (a crash, a full disk) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_log(path: Path, step: int) -> None:
    """Keep the rows of steps <= `step` (atomically): the state a checkpoint at `step` corresponds to."""
    write_lines(path, [json.dumps(r) for r in read_metrics(path) if r["step"] <= step])
