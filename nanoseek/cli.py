"""`nanoseek` command line. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command runs,
so `nanoseek --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from nanoseek.config import ConfigError
from nanoseek.errors import SettingError, UserError, hard_exit_requested

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("nanoseek.demo", "run the whole V3 -> R1 pipeline in miniature and write a report"),
    "tokenizer": ("nanoseek.data.tokenizer_cli", "train a byte-level BPE tokenizer"),
    "data": ("nanoseek.data.cli", "prepare token shards from text / jsonl / parquet"),
    "pretrain": ("nanoseek.train.pretrain", "pretrain a model (TOML config + key=value overrides)"),
    "sft": ("nanoseek.r1.sft", "supervised fine-tuning (cold start, distillation)"),
    "grpo": ("nanoseek.r1.grpo", "GRPO reinforcement learning on a verifiable task"),
    "sample": ("nanoseek.r1.sample", "rejection sampling: keep verified completions as SFT data"),
    "distill": ("nanoseek.r1.distill", "distil a teacher's verified traces into a smaller student"),
    "eval": ("nanoseek.r1.evaluate", "evaluate a model on a task's test split"),
    "r1": ("nanoseek.r1.pipeline", "DeepSeek-R1's four stages (cold start, RL, rejection SFT, RL) + distillation"),
    "generate": ("nanoseek.inference.cli", "generate text from a model directory"),
    "chat": ("nanoseek.inference.chat", "interactive chat with a model"),
    "serve": ("nanoseek.serve.cli", "OpenAI-compatible HTTP server with continuous batching"),
    "cost": ("nanoseek.cost.cli", "parameters, FLOPs, KV cache, GPU-hours, dollars and MFU"),
    "plan": ("nanoseek.plan.cli", "memory, step time and cost of a training or serving job on a cluster"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {n: v for n, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-V3 / R1 in miniature")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    rc = _run(argv)
    if hard_exit_requested():  # a multi-process run: leave without tearing down the process group
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _run(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and not argv[0].startswith("-") else None
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        if not (isinstance(e, (SettingError, ConfigError)) and os.environ.get("RANK", "0") != "0"):
            # a bad setting is the same on every torchrun rank: rank 0 says it, once for the job
            print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `nanoseek ... | head` closed our stdout: not an error of the command
        _silence_stdout()
        return 0
    except OSError as e:  # a file problem the command did not anticipate: still one line, no traceback
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"nanoseek {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nnanoseek {args.command}: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
