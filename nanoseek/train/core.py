"""The training core shared by pretraining, SFT and GRPO.

A recipe supplies a *batch source* (`next_batch()`, `state_dict()`, `load_state_dict()`) and a *loss
function* `loss_fn(model, batch) -> (loss, metrics)`. The core owns everything else: AdamW with fp32
master weights, autocast, gradient accumulation and clipping, the LR schedule, DeepSeek-V3's
auxiliary-loss-free bias update after every optimizer step, the MTP lambda schedule, metrics
(JSONL/TensorBoard/progress bar, tokens/s, MFU), periodic evaluation, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from nanoseek.hf import from_checkpoint, load_state, read_tensors, save_pretrained
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.errors import UserError
from nanoseek.train.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state, save_checkpoint
from nanoseek.train.config import TrainConfig
from nanoseek.train.metrics import MetricsLogger
from nanoseek.train.schedule import lr_at, piecewise

LossFn = Callable[[DeepseekV3ForCausalLM, Any], "tuple[torch.Tensor, dict[str, float]]"]


class BatchSource(Protocol):
    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; CPU trains in fp32 unless asked (exact, deterministic)."""
    if name == "bfloat16" or (name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def default_peak_flops(device: torch.device) -> float:
    """Declared dense peak used for MFU when the config gives none.
    CUDA: H100/H800 SXM BF16 989.5 TFLOPS. CPU: cores x 3 GHz x 2 FMA units x 16 fp32 lanes x 2 (AVX-512)."""
    if device.type == "cuda":
        return 989.5e12
    return (os.cpu_count() or 1) * 3e9 * 2 * 16 * 2


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over fp32 parameters; no weight decay on norms, biases and other 1-D tensors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def load_weights(model: DeepseekV3ForCausalLM, path: Path) -> None:
    tensors = read_tensors(path)
    load_state(model, from_checkpoint(tensors, model.config), str(path))


class Trainer:
    def __init__(self, cfg: TrainConfig, model: DeepseekV3ForCausalLM, flops_per_token: float,
                 tokens_per_step: int, extra_files: dict[str, Path] | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        if cfg.compile:  # per block, so the module tree (and checkpoints) keep their names
            for block in model.model.layers:
                block.compile()
        self.autocast = autocast_dtype(cfg.dtype, self.device)
        self.optimizer = build_optimizer(model, cfg)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step
        self.peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else default_peak_flops(self.device)
        self.extra_files = extra_files or {}
        self.step = 0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ one optimizer step
    def autocast_context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def train_step(self, source: BatchSource, loss_fn: LossFn) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        model.train()
        lr = lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.schedule, cfg.min_lr_ratio,
                   cfg.decay_frac)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = source.next_batch()
            with self.autocast_context():
                loss, metrics = loss_fn(model, batch)
            (loss / cfg.grad_accum).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals.update(self.balance_step())
        totals.update(lr=lr, grad_norm=float(grad_norm))
        return totals

    def mtp_lambda(self) -> float:
        cfg = self.cfg
        return piecewise(self.step, cfg.max_steps, cfg.mtp_lambda, cfg.mtp_lambda_final, cfg.mtp_lambda_switch_frac)

    @torch.no_grad()
    def balance_step(self) -> dict[str, float]:
        """Bias update (aux-free balancing) after the optimizer step, plus load statistics per MoE layer."""
        cfg = self.cfg
        gamma = 0.0
        if cfg.balance == "aux_free":
            gamma = piecewise(self.step, cfg.max_steps, cfg.bias_gamma, 0.0, 1 - cfg.bias_gamma_off_frac)
        stats: dict[str, float] = {}
        ratios, dead = [], []
        for i, moe in enumerate(self.model.moe_layers()):
            load = moe.update_bias(gamma).float()
            if load.sum() == 0:
                continue
            ratio = (load.max() / load.mean()).item()
            ratios.append(ratio)
            dead.append((load == 0).float().mean().item())
            stats[f"load_max_mean/layer{i}"] = ratio
            stats[f"load/layer{i}"] = (load / load.sum()).tolist()
        if ratios:
            stats["load_max_mean"] = sum(ratios) / len(ratios)
            stats["dead_experts"] = sum(dead) / len(dead)
        return stats

    # ------------------------------------------------------------------ the loop
    def fit(self, source: BatchSource, loss_fn: LossFn, evaluate: Callable[[], dict] | None = None,
            sample: Callable[[], dict] | None = None, resume: bool = False,
            on_state: Callable[[dict], None] | None = None, extra_state: Callable[[], dict] | None = None) -> list[dict]:
        """Run until cfg.max_steps. `evaluate`/`sample` return metrics to log; `extra_state` adds recipe
        state to checkpoints and `on_state` restores it on resume."""
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(self.out_dir / "train_config.json")
        resumed = resume and self.resume(source, on_state)
        if not resumed and list_checkpoints(self.ckpt_dir):
            raise UserError(f"{self.out_dir} already holds checkpoints of another run: resume it (--resume) "
                            "or choose a new out_dir")
        logger = MetricsLogger(self.out_dir, cfg.tensorboard, fresh=not resumed)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {self.out_dir.name}", unit="step",
                   dynamic_ncols=True, disable=os.environ.get("NANOSEEK_NO_PROGRESS") == "1")
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                metrics = self.train_step(source, loss_fn)
                dt = time.perf_counter() - t0
                self.step += 1
                metrics["tokens_per_s"] = self.tokens_per_step / dt
                metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / self.peak
                last = self.step == cfg.max_steps
                if evaluate and (last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                    metrics.update(evaluate())
                if sample and (last or (cfg.sample_every and self.step % cfg.sample_every == 0)):
                    metrics.update(sample())
                if self.step % cfg.log_every == 0 or last or "val_loss" in metrics:
                    logger.log(self.step, metrics)
                self.history.append({"step": self.step, **metrics})
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "val_loss", "reward", "lr", "tokens_per_s")
                                 if k in metrics})
                bar.update(1)
                if last or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save(source, extra_state)
        finally:
            bar.close()
            logger.close()
        self.export()
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def save(self, source: BatchSource, extra_state: Callable[[], dict] | None = None) -> Path:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "data": source.state_dict(),
                 "rng": rng_state(), "train_config": self.cfg.to_dict(),
                 "extra": extra_state() if extra_state else {}}
        return save_checkpoint(self.ckpt_dir, self.step, self.model, state, self.extra_files, self.cfg.keep_last)

    def resume(self, source: BatchSource, on_state: Callable[[dict], None] | None = None) -> bool:
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        load_weights(self.model, path)
        state = load_trainer_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        source.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        if on_state:
            on_state(state.get("extra", {}))
        print(f"resumed from {path} (step {self.step})")
        return True

    def export(self) -> Path:
        """The final model as a self-contained HF directory (weights + config + tokenizer), atomically."""
        final = self.out_dir / "model"
        tmp = self.out_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(self.model, tmp)
        for name, src in self.extra_files.items():
            shutil.copyfile(src, tmp / name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final


def lm_loss_fn(trainer: Trainer) -> LossFn:
    """Pretraining loss: next-token CE + lambda * MTP CE + sequence-wise balance loss."""

    def loss_fn(model: DeepseekV3ForCausalLM, batch: torch.Tensor):
        batch = batch.to(trainer.device)
        out = model(batch, labels=batch, mtp_weight=trainer.mtp_lambda())
        metrics = {"loss": out.loss.item(), "lm_loss": out.lm_loss.item()}
        if out.mtp_loss is not None:
            metrics["mtp_loss"] = out.mtp_loss.item()
        if out.balance_loss is not None:
            metrics["balance_loss"] = out.balance_loss.item()
        return out.loss, metrics

    return loss_fn
