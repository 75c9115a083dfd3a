"""`nanoseek sft --model DIR --data FILE.jsonl [key=value ...] [--resume]`: supervised fine-tuning.

Used for R1's cold start (a few long chain-of-thought examples before RL) and for distillation
(the verified traces of `nanoseek sample`). Each JSONL line is either

    {"prompt": "...", "completion": "..."}      prompt rendered with `template` (default: as is)
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}

and the loss covers only what the model must learn to write: the completion (or every assistant
message) plus its closing eos. Prompt and completion are tokenized separately, exactly as at
inference time, where the prompt is encoded alone and the model continues it.

Packing (`pack=true`, the default) concatenates examples into sequences of up to `seq_len` tokens.
Packed examples are isolated: a block-diagonal attention mask keeps each example from seeing the
others, positions restart at 0 for every example, and the first tokens of each example are never a
target, so no loss crosses an example boundary (the main and the MTP heads alike). A packed batch
therefore gives the same per-token losses as the examples one by one, without the padding.

Several processes (`torchrun --nproc-per-node N -m nanoseek sft ... parallel.dp_shard=N`): every
rank draws the same global batch and trains on its own rows of it; the loss is normalised by the
global batch's target tokens, so the ranks' losses add up to the one-process loss (`packed_lm_loss`,
docs/distributed.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.jsonl import read_jsonl_objects
from nanoseek.data.shuffle import EpochOrder
from nanoseek.data.tokenizer import ROLES, load_tokenizer
from nanoseek.device import resolve_device
from nanoseek.errors import UserError, warn
from nanoseek.hf import model_directory, tokenizer_files
from nanoseek.r1.configs import SFTConfig
from nanoseek.r1.rollout import encode_prompt, tokenizer_dir_for
from nanoseek.r1.tasks import Problem
from nanoseek.parallel.runtime import ParallelRuntime
from nanoseek.train.config import load_train_config
from nanoseek.train.core import Trainer, print_summary, seed_everything
from nanoseek.train.pretrain import build_model, train_flops_per_token

# ================================================================== examples


@dataclass
class Example:
    """One tokenized example; `target[i]` says whether token i is learned (completion / assistant)."""

    ids: list[int]
    target: list[bool]
    line: int


def load_sft_examples(path: str | Path, tokenizer, template: str = "none") -> list[Example]:
    """Tokenize every line of an SFT JSONL file. One UserError, naming the file and line, for a
    missing file, bad JSON, missing or malformed fields, and for a file with no examples."""
    examples = [example_from_row(row, tokenizer, template, where, lineno)
                for lineno, where, row in read_jsonl_objects(path, label="SFT data ")]
    if not examples:
        raise UserError(f"SFT data {path}: no examples (the file is empty)")
    return examples


def example_from_row(row: dict, tokenizer, template: str, where: str, lineno: int = 0) -> Example:
    if "messages" in row:
        return _chat_example(row["messages"], tokenizer, where, lineno)
    missing = [k for k in ("prompt", "completion") if k not in row]
    if missing:
        raise UserError(f"{where}: missing field {' and '.join(map(repr, missing))} (a line needs "
                        f"'prompt' and 'completion', or 'messages'; fields present: "
                        f"{', '.join(map(repr, row)) or 'none'})")
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise UserError(f"{where}: 'prompt' must be a string and 'completion' a non-empty string")
    if template == "none":
        head = tokenizer.encode(prompt)  # a user file's text: typed control tokens stay text
    else:
        meta = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
        head = encode_prompt(Problem(prompt, str(row.get("answer", "")), meta), template, tokenizer)
    tail = tokenizer.encode(completion) + [tokenizer.eos_id]
    return Example(head + tail, [False] * len(head) + [True] * len(tail), lineno)


def _chat_example(messages: Any, tokenizer, where: str, lineno: int) -> Example:
    """The chat format built by `tokenizer.encode_chat` (BOS, then role token + content + eos per
    turn; contents encoded as text, so a typed `<|system|>` cannot forge a turn). Each assistant
    turn's content and its eos are the targets."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    ids, target = tokenizer.encode_chat([], add_generation_prompt=False), [False]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise UserError(f"{where}: message {i}: role must be one of {', '.join(ROLES)} "
                            f"and content a string")
        turn = tokenizer.encode_chat(messages[:i + 1], add_generation_prompt=False)[len(ids):]
        ids += turn
        target += [False] + [m["role"] == "assistant"] * (len(turn) - 1)  # role token: never
    if not any(target):
        raise UserError(f"{where}: no assistant message to learn from")
    return Example(ids, target, lineno)


# ================================================================== packing and batches


@dataclass
class Packed:
    """One training sequence: ids, labels (-100 = no loss), segment (1.. per example, 0 = pad)
    and positions restarting at 0 for every example."""

    ids: list[int]
    labels: list[int]
    segments: list[int]
    positions: list[int]


def check_lengths(examples: list[Example], seq_len: int, too_long: str) -> list[Example]:
    long = [e for e in examples if len(e.ids) > seq_len]
    if long and too_long == "error":
        e = long[0]
        raise UserError(f"line {e.line}: example of {len(e.ids)} tokens is longer than seq_len="
                        f"{seq_len} ({len(long)} such example(s)); raise seq_len (up to the "
                        f"model's context) or set too_long=skip")
    if long:
        warn(f"sft: skipping {len(long)} example(s) longer than seq_len={seq_len}")
    kept = [e for e in examples if len(e.ids) <= seq_len]
    if not kept:
        raise UserError(f"no example fits seq_len={seq_len}")
    return kept


def pack_examples(examples: list[Example], seq_len: int, pack: bool = True,
                  no_target_prefix: int = 1) -> list[Packed]:
    """Next-fit packing in the given order (one example per sequence when `pack` is False). The
    first `no_target_prefix` tokens of every example are never targets: with MTP depth D, pass
    D + 1 so no head predicts across a boundary."""
    out: list[Packed] = []
    current = Packed([], [], [], [])
    for ex in examples:
        if current.ids and (not pack or len(current.ids) + len(ex.ids) > seq_len):
            out.append(current)
            current = Packed([], [], [], [])
        seg = (current.segments[-1] if current.segments else 0) + 1
        current.ids += ex.ids
        current.labels += [t if learn and i >= no_target_prefix else -100
                           for i, (t, learn) in enumerate(zip(ex.ids, ex.target))]
        current.segments += [seg] * len(ex.ids)
        current.positions += list(range(len(ex.ids)))
    if current.ids:
        out.append(current)
    return out


def collate(seqs: list[Packed], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch (segment 0 and label -100 on padding)."""
    width = max(len(s.ids) for s in seqs)

    def pad(rows, value):
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    return {"input_ids": pad([s.ids for s in seqs], pad_id),
            "labels": pad([s.labels for s in seqs], -100),
            "segments": pad([s.segments for s in seqs], 0),
            "positions": pad([s.positions for s in seqs], 0)}


def rows_of(batch: dict[str, torch.Tensor], rank: int, ranks: int) -> dict[str, torch.Tensor]:
    """Data-parallel rank `rank`'s rows of a global batch, with the global batch's `target_tokens`
    and `rows`, which `packed_lm_loss` normalises by (one rank: the whole batch)."""
    mine = {k: torch.tensor_split(v, ranks)[rank] for k, v in batch.items()}
    mine["target_tokens"] = int((batch["labels"][:, 1:] != -100).sum())
    mine["rows"] = batch["labels"].shape[0]
    return mine


class SFTSource:
    """Batches of packed sequences in a fresh seeded order every epoch; resumable exactly (the
    state is the number of sequences consumed, checked against a fingerprint of the data).
    With several data-parallel ranks every rank draws the same global batch and keeps its rows of it
    (`rank` of `ranks`), so the position is global and a run resumes at any layout."""

    def __init__(self, seqs: list[Packed], batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 ranks: int = 1):
        if not seqs:
            raise UserError("SFT: no training sequences")
        if len(seqs) < ranks:
            raise UserError(f"SFT: {len(seqs)} training sequence(s) cannot be split over {ranks} data-parallel "
                            "ranks (each needs at least one row)")
        self.seqs, self.batch_size, self.seed, self.pad_id = seqs, batch_size, seed, pad_id
        self.rank, self.ranks = rank, ranks
        self.consumed = 0
        self.fingerprint = _fingerprint(seqs)
        self.order = EpochOrder(len(seqs), seed, stream="sft")

    @property
    def batches_per_epoch(self) -> int:
        return max(1, -(-len(self.seqs) // self.batch_size))

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked = []
        for _ in range(min(self.batch_size, len(self.seqs))):
            picked.append(self.seqs[self.order[self.consumed]])
            self.consumed += 1
        return rows_of(collate(picked, self.pad_id), self.rank, self.ranks)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise UserError("cannot resume SFT: the data (or seq_len / packing / tokenizer) "
                            "changed since the checkpoint was written")
        self.consumed = int(state["consumed"])


def _fingerprint(seqs: list[Packed]) -> str:
    h = hashlib.sha256()
    for s in seqs:
        h.update(json.dumps([s.ids, s.labels]).encode())
    return h.hexdigest()


# ================================================================== loss


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids -> bool [B, 1, T, T]: causal attention within the same example only.
    Padding (segment 0) attends to padding, so its rows stay finite; their outputs are unused."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (causal & same)[:, None]


def packed_lm_loss(model, batch: dict[str, torch.Tensor], mtp_weight: float = 0.0, ranks: int = 1):
    """Completion-only next-token loss on packed sequences (+ MTP and MoE balance losses), through
    the model's public forward: the block-diagonal `segment_mask` as attention mask, positions
    restarting per example, -100 labels ignored. Returns (loss, metrics).

    `batch` may be one data-parallel rank's rows of a global batch (`rows_of`; `ranks` ranks): the
    token losses (next-token and MTP, means over this rank's targets) are then re-weighted by this
    rank's share of the global batch's target tokens, and the per-sequence balance loss by its share
    of the rows, so the ranks' losses add up to the one-process loss on the global batch, however
    unevenly the targets fall. Each is multiplied by `ranks` because the gradients are averaged over
    the ranks (FSDP2), and so are the metrics. Packing keeps the first MTP-depth + 1 tokens of every
    example off the targets, so every MTP depth has the same targets as the next-token loss and one
    count serves all. One rank with the whole batch: both shares are exactly 1."""
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    weight = model.config.mtp_loss_weight if mtp_weight is None else mtp_weight
    out = model(batch["input_ids"].to(device), labels=labels,
                attention_mask=segment_mask(batch["segments"].to(device)),
                position_ids=batch["positions"].to(device), mtp_weight=weight)
    targets = int((labels[:, 1:] != -100).sum())
    batch_targets, batch_rows = batch.get("target_tokens", targets), batch.get("rows", labels.shape[0])
    token_share = ranks * targets / max(batch_targets, 1)
    row_share = ranks * labels.shape[0] / batch_rows
    lm, mtp = out.lm_loss, out.mtp_loss
    if targets == 0 and batch_targets > 0:  # no target in these rows (a mean over none is NaN): add 0
        lm, mtp = lm.nan_to_num(), None if mtp is None else mtp.nan_to_num()
    loss = lm if mtp is None else lm + weight * mtp
    loss = loss * token_share
    metrics = {"lm_loss": lm.item() * token_share}
    if mtp is not None:
        metrics["mtp_loss"] = mtp.item() * token_share
    if out.balance_loss is not None:
        loss = loss + out.balance_loss * row_share
        metrics["balance_loss"] = out.balance_loss.item() * row_share
    metrics["loss"] = loss.item()
    metrics["target_tokens"] = float(batch_targets)
    return loss, metrics


@torch.no_grad()
def val_loss(model, seqs: list[Packed], batch_size: int, pad_id: int) -> float:
    """Token-weighted completion loss over `seqs` in eval mode."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        batch = collate(seqs[i:i + batch_size], pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:
            loss, _ = packed_lm_loss(model, batch)
            total, count = total + loss.item() * n, count + n
    model.train(was)
    return total / max(1, count)


# ================================================================== running


def sft_data(cfg: SFTConfig, examples: list[Example], n_mtp: int) -> tuple[list[Packed], list[Packed]]:
    """(train, val) packed sequences of length-checked examples: seeded shuffle, split, pack."""
    examples = list(examples)
    random.Random(f"sft-split:{cfg.seed}").shuffle(examples)
    n_val = int(len(examples) * cfg.val_fraction)
    if n_val == 0 and cfg.val_fraction > 0 and len(examples) > 1:
        n_val = 1
    val, train = examples[:n_val], examples[n_val:]
    if not train:
        raise UserError("SFT: no training examples left after the validation split")
    return tuple(pack_examples(exs, cfg.seq_len, cfg.pack, no_target_prefix=n_mtp + 1)
                 for exs in (train, val))


def run_sft(cfg: SFTConfig, resume: bool = False) -> Trainer:
    """Fine-tune `cfg.init_from` (or a fresh `cfg.model`) on `cfg.data` with the shared core;
    returns the Trainer (history, out_dir/model = the exported result)."""
    if not cfg.data:
        raise UserError("SFT needs data=FILE.jsonl (or --data)")
    if cfg.init_from:
        model_directory(cfg.init_from)
    cfg.validate()
    parallel = ParallelRuntime.for_run(cfg.parallel, resolve_device(cfg.device))
    rank, ranks = parallel.dp_rank, parallel.dp_size
    seed_everything(cfg.seed)  # the same on every rank: identical weights before sharding
    tok_dir = tokenizer_dir_for(cfg)
    tokenizer = load_tokenizer(tok_dir)
    # the data is read and checked before the model is built: a bad line fails in a second
    examples = check_lengths(load_sft_examples(cfg.data, tokenizer, cfg.template), cfg.seq_len,
                             cfg.too_long)
    model = build_model(cfg, tokenizer.vocab_size, cfg.seq_len)
    if cfg.mtp_lambda == 0 and cfg.mtp_lambda_final == 0:
        # MTP weight 0 throughout: the MTP modules never run. Frozen, they get no optimizer state, which a
        # sharded checkpoint must hold for every trained weight to load again.
        model.mtp.requires_grad_(False)
    train, val = sft_data(cfg, examples, len(model.mtp))
    source = SFTSource(train, cfg.batch_size, cfg.seed, tokenizer.pad_id, rank, ranks)
    if cfg.epochs:
        steps = -(-cfg.epochs * source.batches_per_epoch // cfg.grad_accum)
        cfg = dataclasses.replace(cfg, max_steps=steps)
    tokens = sum(len(s.ids) for s in train) / len(train) * cfg.batch_size * cfg.grad_accum
    trainer = Trainer(cfg, model, train_flops_per_token(model.config, cfg.seq_len), int(tokens),
                      extra_files=tokenizer_files(tok_dir), parallel=parallel)
    if trainer.main:
        print(f"sft: {len(train)} training sequences, {len(val)} validation; {cfg.max_steps} steps "
              f"of {cfg.batch_size * cfg.grad_accum} sequences")

    def loss_fn(model, batch):
        return packed_lm_loss(model, batch, cfg.mtp_weight(trainer.step), ranks)

    def evaluate() -> dict:  # every rank the whole validation set: the same forwards on every rank
        return {"val_loss": val_loss(model, val, cfg.batch_size, tokenizer.pad_id)} if val else {}

    trainer.fit(source, loss_fn, evaluate=evaluate, resume=resume)
    return trainer


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory to fine-tune (HF format with tokenizer.json)")
    p.add_argument("--data", help="JSONL of {prompt, completion} or {messages} lines")
    p.add_argument("--config", help="TOML file with SFT settings")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. max_steps=300 lr=3e-4 seq_len=256 template=compact out_dir=runs/sft")


def config_from_args(cls, args: argparse.Namespace, extra: list[str] | None = None):
    """Load `cls` from --config and overrides; --model sets both `model` and `init_from`."""
    overrides = list(extra or [])
    if getattr(args, "model", None):
        overrides += [f"model={args.model}", f"init_from={args.model}"]
    if getattr(args, "data", None):
        overrides.append(f"data={args.data}")
    cfg = load_train_config(cls, args.config, overrides + list(args.overrides))
    if not cfg.init_from:
        raise UserError("give the model to fine-tune with --model DIR")
    model_directory(cfg.init_from)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(SFTConfig, args)
    trainer = run_sft(cfg, resume=args.resume)
    if trainer.main:
        print_summary(trainer, ("loss", "val_loss", "tokens_per_s"))
    trainer.parallel.close()
    return 0
