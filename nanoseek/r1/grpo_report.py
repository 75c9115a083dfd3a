"""What a GRPO run reports besides its metrics: held-out greedy accuracy and the sample table
(printed, and appended to samples.jsonl)."""

from __future__ import annotations

import json
import os

from nanoseek.r1.configs import GRPOConfig
from nanoseek.r1.evaluate import evaluate_model
from nanoseek.r1.grpo_batches import RolloutSource
from nanoseek.r1.tasks import Task
from nanoseek.train.core import Trainer


def greedy_eval(model, tokenizer, task: Task, cfg: GRPOConfig) -> dict:
    """Held-out greedy accuracy on the first `eval_problems` test problems."""
    if not task.test or cfg.eval_problems <= 0:
        return {}
    r = evaluate_model(model, tokenizer, task, k=0, template=cfg.template,
                       max_new_tokens=cfg.max_new_tokens, n_problems=cfg.eval_problems,
                       batch_size=cfg.rollout_batch_size)
    return {"test_accuracy": r.greedy_accuracy, "test_format": r.format_rate,
            "test_response_length": r.mean_response_length}


def write_samples(trainer: Trainer, source: RolloutSource) -> dict:
    """Append the current batch's sample completions to samples.jsonl and print them as a table."""
    batch = source.batch
    if batch is None or not batch.samples:
        return {}
    path = trainer.out_dir / "samples.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        for row in batch.samples:
            f.write(json.dumps({"step": trainer.step, **row}) + "\n")
    if os.environ.get("NANOSEEK_NO_PROGRESS") != "1":
        from rich.console import Console

        Console(stderr=True).print(samples_table(batch.samples, trainer.step))
    return {}


def samples_table(rows: list[dict], step: int):
    from rich.table import Table

    table = Table(title=f"GRPO samples, step {step}", show_lines=True)
    for name in ("prompt", "completion", "reward", "acc", "fmt", "tokens"):
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(_clip(r["prompt"], 40), _clip(r["completion"], 100), f"{r['reward']:.2f}",
                      f"{r['accuracy']:.0f}", f"{r['format']:.0f}",
                      f"{r['tokens']}{'+' if r['finish_reason'] == 'length' else ''}")
    return table


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]
