"""What a GRPO run reports besides its metrics: held-out greedy accuracy and the sample table
(printed, and appended to samples.jsonl)."""

from __future__ import annotations

import json
import os

from nanoseek.r1.configs import GRPOConfig
from nanoseek.r1.grpo_batches import RolloutSource
from nanoseek.r1.grpo_ranks import DataParallelRanks
from nanoseek.r1.rollout import rollout
from nanoseek.r1.tasks import Task
from nanoseek.train.core import Trainer


def greedy_eval(model, tokenizer, task: Task, cfg: GRPOConfig, ranks: DataParallelRanks | None = None) -> dict:
    """Held-out greedy accuracy, format share and length on the first `eval_problems` test problems. With
    several data-parallel ranks each rolls out every `ranks.size`-th problem on its own copy of the policy
    and the counts are summed: the job evaluates each problem once, not once per rank."""
    if not task.test or cfg.eval_problems <= 0:
        return {}
    ranks = ranks or DataParallelRanks()
    problems = task.test[:cfg.eval_problems][ranks.rank::ranks.size]
    samples = [row[0].sample for row in rollout(model, tokenizer, task, problems, n=1, temperature=0.0,
                                                template=cfg.template, max_new_tokens=cfg.max_new_tokens,
                                                batch_size=cfg.rollout_batch_size, progress="eval greedy")] \
        if problems else []
    correct, well_formed, tokens, n = ranks.sum([sum(x.correct for x in samples), sum(x.well_formed for x in samples),
                                                 sum(x.n_tokens for x in samples), len(samples)])
    return {"test_accuracy": correct / n, "test_format": well_formed / n, "test_response_length": tokens / n}


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
