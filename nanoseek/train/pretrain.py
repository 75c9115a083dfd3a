"""`nanoseek pretrain --config run.toml [key=value ...] [--resume]`: V3-style pretraining on token shards.

The same entry point does context extension: `init_from=<model dir> yarn_factor=4 yarn_original_len=256
seq_len=1024` loads the weights (and, unless `model=` is given, their config), switches RoPE to YaRN and
continues at the longer length.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch

from nanoseek.cost.accounting import train_flops_per_token as flops_per_token
from nanoseek.device import resolve_device
from nanoseek.errors import SettingError, UserError, warn
from nanoseek.fp8 import fp8_model_build
from nanoseek.hf import load_weights, tokenizer_files
from nanoseek.inference.engine import hf_generate
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.parallel.runtime import ParallelRuntime
from nanoseek.train.config import LanguageModelingConfig, PretrainConfig, TrainerConfig, load_train_config
from nanoseek.train.core import LossFn, Trainer, print_summary, seed_everything


def train_flops_per_token(model_cfg, seq_len: int) -> float:
    """FLOPs per trained token from nanoseek.cost (causal attention and the MTP modules included)."""
    return flops_per_token(model_cfg, seq_len, include_mtp=model_cfg.num_nextn_predict_layers > 0)


@torch.no_grad()
def evaluate_loss(model: DeepseekV3ForCausalLM, data_dir: str, seq_len: int, batch_size: int, batches: int,
                  device: torch.device, split: str = "val", score: Callable[[torch.Tensor], float] | None = None
                  ) -> float:
    """Mean next-token loss over the first `batches` batches of a split, in a fixed order. `score`: the loss
    of one batch when the model is not whole on this rank (pipeline stages), default a forward of `model`."""
    from nanoseek.data import TokenLoader

    loader = TokenLoader(data_dir, split, seq_len=seq_len, batch_size=batch_size, shuffle=False, verify=False)
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(min(batches, max(1, loader.batches_per_epoch))):
        x = loader.next_batch().to(device)
        losses.append(score(x) if score else model(x, labels=x, mtp_weight=0.0).lm_loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


def build_model(cfg: TrainerConfig, vocab_needed: int, seq_len: int | None = None) -> DeepseekV3ForCausalLM:
    """The model of `cfg` (weights from init_from when set), checked against the tokenizer's vocabulary
    and, when given, the training sequence length."""
    model_cfg = cfg.model_config()
    if vocab_needed > model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {vocab_needed} tokens but the model's vocab_size is "
                        f"{model_cfg.vocab_size}: set model.vocab_size={vocab_needed} (or larger)")
    if seq_len is not None and seq_len > model_cfg.max_position_embeddings:
        raise UserError(f"seq_len={seq_len} exceeds the model's max_position_embeddings="
                        f"{model_cfg.max_position_embeddings} (use YaRN: yarn_factor=..., or raise it)")
    with fp8_model_build(cfg.fp8):  # fp8=true: FP8 projections and routed experts (docs/fp8.md)
        model = DeepseekV3ForCausalLM(model_cfg)
    if cfg.init_from:
        if not Path(cfg.init_from).is_dir():
            raise UserError(f"init_from={cfg.init_from} is not a model directory")
        load_weights(model, Path(cfg.init_from))
    return model


def lm_loss_fn(cfg: LanguageModelingConfig, trainer: Trainer) -> LossFn:
    """Pretraining loss: next-token CE + lambda * MTP CE + sequence-wise balance loss, with lambda from
    the config's schedule at the trainer's current step."""

    def loss_fn(model: DeepseekV3ForCausalLM, batch: torch.Tensor):
        batch = batch.to(trainer.device)
        out = model(batch, labels=batch, mtp_weight=cfg.mtp_weight(trainer.step))
        metrics = {"loss": out.loss.item(), "lm_loss": out.lm_loss.item()}
        if out.mtp_loss is not None:
            metrics["mtp_loss"] = out.mtp_loss.item()
        if out.balance_loss is not None:
            metrics["balance_loss"] = out.balance_loss.item()
        return out.loss, metrics

    # with pipeline stages the stages compute this loss themselves (nanoseek.parallel.pipeline): they need lambda
    loss_fn.pipeline_settings = lambda: {"mtp_weight": cfg.mtp_weight(trainer.step)}
    return loss_fn


def run_pretraining(cfg: PretrainConfig, resume: bool = False) -> Trainer:
    """Train (and export) the model of `cfg`. With `parallel.*` settings every torchrun process calls
    this: each data-parallel rank reads its own `batch_size / ranks` rows of every global batch."""
    from nanoseek.data import TokenLoader

    cfg.validate()
    cfg.parallel.validate_batch(cfg.batch_size)  # micro-batches of the pipeline: still before any process group
    if cfg.compile and cfg.parallel.v_shape:  # torch splits the backward of their stages, which compile cannot
        raise SettingError(f"compile=true cannot be combined with parallel.schedule={cfg.parallel.schedule} "
                           "(use 1f1b or interleaved_1f1b, or compile=false)")
    parallel = ParallelRuntime.for_run(cfg.parallel, resolve_device(cfg.device))
    dp_rank, dp_size = parallel.dp_rank, parallel.dp_size
    seed_everything(cfg.seed)  # the same on every rank: identical initial weights before sharding
    loader = TokenLoader(cfg.data, "train", seq_len=cfg.seq_len, batch_size=cfg.batch_size // dp_size,
                         seed=cfg.seed, rank=dp_rank, world_size=dp_size)
    model = build_model(cfg, loader.vocab_size, cfg.seq_len)
    tokens_per_step = cfg.seq_len * cfg.batch_size * cfg.grad_accum
    extra_files = tokenizer_files(loader.tokenizer_dir)
    if not extra_files:
        warn(f"{cfg.data} has no tokenizer ({loader.tokenizer_dir}): the exported model will have no tokenizer "
             "(generate and chat will need --tokenizer)")
    trainer = Trainer(cfg, model, train_flops_per_token(model.config, cfg.seq_len), tokens_per_step,
                      extra_files=extra_files, parallel=parallel)

    pipeline = parallel.pipeline

    def evaluate() -> dict:
        try:
            loss = evaluate_loss(model, cfg.data, cfg.seq_len, cfg.batch_size, cfg.eval_batches, trainer.device,
                                 score=pipeline.forward_loss if pipeline else None)
        except UserError:  # no validation split
            return {}
        return {"val_loss": loss}

    def sample() -> dict:
        return {"sample": sample_text(model, loader.tokenizer_dir, cfg.sample_prompt, trainer.device)}

    if pipeline and cfg.sample_prompt and trainer.main:
        warn("sample_prompt is not used with parallel.pp > 1 (no rank holds the whole model to generate with); "
             "the exported model generates as usual")
    trainer.fit(loader, lm_loss_fn(cfg, trainer), evaluate=evaluate, sample=None if pipeline else sample,
                resume=resume, sample_every=cfg.sample_every)
    return trainer


@torch.no_grad()
def sample_text(model: DeepseekV3ForCausalLM, tokenizer_dir: Path, prompt: str, device: torch.device,
                max_new_tokens: int = 32) -> str:
    """A short greedy continuation, logged so a run shows what the model has learned."""
    if not prompt or not (tokenizer_dir / "tokenizer.json").exists():
        return ""
    from nanoseek.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = torch.tensor([tok.encode(prompt)], device=device)
    was_training = model.training
    model.eval()
    out = hf_generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=tok.eos_id)
    model.train(was_training)
    return prompt + tok.decode(out[0, ids.shape[1]:].tolist(), skip_special=True)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with PretrainConfig fields ([model_overrides] table = ModelConfig "
                                    "fields)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override a setting, e.g. max_steps=500 lr=1e-3 model.n_routed_experts=16")


def run(args: argparse.Namespace) -> int:
    cfg = load_train_config(PretrainConfig, args.config, args.overrides)
    trainer = run_pretraining(cfg, resume=args.resume)
    if trainer.main:
        print_summary(trainer, ("loss", "val_loss", "load_max_mean", "tokens_per_s", "mfu"))
    trainer.parallel.close()
    return 0
