"""`nanoseek distill --teacher-traces traces.jsonl --student tiny|CONFIG|DIR [key=value ...]`.

Distillation as DeepSeek-R1 did it: plain SFT of a smaller student on the teacher's verified
reasoning traces (from `nanoseek sample`), no RL. The student is

* a model directory (HF format): fine-tuned from its weights, with its own tokenizer;
* a preset name (`tiny`, `small`, ...) or a config.json: a fresh, randomly initialized model whose
  vocabulary is sized to the tokenizer (the teacher's, recorded in the traces, or `--tokenizer`).

Traces carry the exact prompt the teacher saw, so they are used as is (template "none").
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from nanoseek.config import PRESETS
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.errors import UserError
from nanoseek.r1.configs import DistillConfig
from nanoseek.r1.sft import run_sft
from nanoseek.train.config import load_train_config
from nanoseek.train.core import Trainer, print_summary


def teacher_dir_from_traces(path: str | Path) -> str:
    """The teacher model directory recorded by `nanoseek sample` (first row), or ""."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return str(json.loads(line).get("model", "") or "")
    except (OSError, json.JSONDecodeError):
        return ""  # load_sft_examples reports the problem with the file properly
    return ""


def student_config(cfg: DistillConfig) -> DistillConfig:
    """Resolve the student: a directory is fine-tuned from its weights; a preset or config.json
    starts from scratch with vocab_size = the tokenizer's (unless set explicitly)."""
    spec = cfg.model
    if Path(spec).is_dir():
        return replace(cfg, init_from=spec)
    if spec not in PRESETS and not Path(spec).is_file():
        raise UserError(f"student {spec!r} is neither a preset ({', '.join(PRESETS)}), a config "
                        f"file, nor a model directory")
    tokenizer = cfg.tokenizer or teacher_dir_from_traces(cfg.data)
    if not tokenizer or not (Path(tokenizer) / "tokenizer.json").is_file():
        raise UserError("a student built from a preset or config needs a tokenizer: pass "
                        "--tokenizer DIR (or traces written by `nanoseek sample`, which name "
                        "the teacher)")
    overrides = dict(cfg.model_overrides)
    if "vocab_size" not in overrides:
        overrides["vocab_size"] = load_tokenizer(tokenizer).vocab_size
    return replace(cfg, tokenizer=tokenizer, init_from="", model_overrides=overrides)


def run_distill(cfg: DistillConfig, resume: bool = False) -> Trainer:
    """SFT of the student on the traces in `cfg.data`."""
    if not cfg.data:
        raise UserError("distill needs the teacher's traces (--teacher-traces FILE.jsonl)")
    traces = Path(cfg.data)
    if not traces.exists():
        raise UserError(f"teacher traces {traces}: no such file (write them with `nanoseek sample`)")
    if not traces.is_file():
        raise UserError(f"teacher traces {traces}: not a file (a directory?); give the JSONL file")
    return run_sft(student_config(cfg), resume=resume)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher-traces", required=True,
                   help="JSONL of verified traces (nanoseek sample --out)")
    p.add_argument("--student", default="tiny",
                   help="preset name, config.json, or model directory of the student")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the student's, else the "
                                       "teacher's recorded in the traces)")
    p.add_argument("--config", help="TOML file with SFT settings")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. max_steps=500 lr=1e-3 seq_len=128 out_dir=runs/distill")


def run(args: argparse.Namespace) -> int:
    overrides = [f"model={args.student}", f"data={args.teacher_traces}"]
    if args.tokenizer:
        overrides.append(f"tokenizer={args.tokenizer}")
    cfg = load_train_config(DistillConfig, args.config, overrides + list(args.overrides))
    trainer = run_distill(cfg, resume=args.resume)
    print_summary(trainer, ("loss", "val_loss"), label="student")
    return 0
