"""The training core shared by pretraining, SFT and GRPO.

A recipe supplies a *batch source* (`next_batch()`, `state_dict()`, `load_state_dict()`) and a *loss
function* `loss_fn(model, batch) -> (loss, metrics)`. The core owns everything else: AdamW with fp32
master weights, autocast, gradient accumulation and clipping, the LR schedule, DeepSeek-V3's
auxiliary-loss-free bias update after every optimizer step, metrics
(JSONL/TensorBoard/progress bar, tokens/s, MFU), periodic evaluation, atomic checkpoints, exact resume,
and divergence handling (a step with non-finite loss or gradients is not applied; see `nonfinite`).

One process and several (torchrun, `parallel.*`) run the same code: the trainer always holds a
`ParallelRuntime` (the recipe's, or one it starts: the trivial 1-rank mesh of a single process). It lays the
model out on the mesh (EP + FSDP2, pipeline stages with `parallel.pp`: the stages compute the loss and run
the schedule's forward and backward; nothing on the trivial mesh), completes and clips gradients over all
ranks, averages the logged metrics, writes sharded checkpoints (torch.distributed.checkpoint: a single
process writes the same format, one shard) and exports the gathered model from rank 0 (nanoseek.parallel,
docs/distributed.md).

A batch source's `state_dict()` must return plain values (dict, list, tuple, str, int, float, bool,
None), torch tensors and numpy arrays: checkpoints store it as JSON + safetensors, never as a pickle.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from nanoseek.device import resolve_device
from nanoseek.errors import UserError, is_finite_number, warn
from nanoseek.files import WriteError, atomic_dir, write_json
from nanoseek.fp8.optim import AdamW as BF16MomentAdamW
from nanoseek.hf import load_weights, save_config, save_pretrained
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.dcp_safe import is_sharded
from nanoseek.parallel.runtime import ParallelRuntime
from nanoseek.train.checkpoint import (
    checkpoint_name,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    prune,
    remove_partial,
    require_finite,
)
from nanoseek.train.config import TrainerConfig
from nanoseek.train.metrics_log import MetricsLogger
from nanoseek.train.mfu import peak_flops
from nanoseek.train.schedule import lr_at, piecewise
from nanoseek.train.trainer_state import load_trainer_state, write_trainer_state

HISTORY_ROWS = 1000  # Trainer.history keeps the newest rows only; metrics.jsonl has them all

LossFn = Callable[[DeepseekV3ForCausalLM, Any], "tuple[torch.Tensor, dict[str, float]]"]


class BatchSource(Protocol):
    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; CPU trains in fp32 unless asked (exact, deterministic)."""
    if name == "bfloat16" or (name == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


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


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW over fp32 parameters; no weight decay on norms, biases and other 1-D tensors. Moments in
    fp32, or in BF16 with adam_moments=bfloat16 (V3; nanoseek.fp8.optim)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.adam_moments == "bfloat16":
        return BF16MomentAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


class Trainer:
    def __init__(self, cfg: TrainerConfig, model: DeepseekV3ForCausalLM, flops_per_token: float,
                 tokens_per_step: int, extra_files: dict[str, Path] | None = None,
                 parallel: ParallelRuntime | None = None):
        """`extra_files`: tokenizer files (name -> path) saved with every checkpoint and the exported model.
        `parallel`: the recipe's runtime (it needs the ranks before building its data); None starts the
        trivial mesh of one process."""
        cfg.validate()  # cheap; recipes built from Python (not the CLI) are checked here too
        if parallel is None:
            if cfg.parallel.enabled:
                raise UserError("parallel.* settings: this command trains in one process only (multi-process "
                                "training: `nanoseek pretrain`, `sft`, `grpo`)")
            parallel = ParallelRuntime.for_run(cfg.parallel, resolve_device(cfg.device))
        self.cfg = cfg
        self.parallel = parallel
        self.main = parallel.is_main  # the rank that logs and exports
        self.device = parallel.device
        self.model = model.to(self.device)
        if cfg.compile:  # per block, so the module tree (and checkpoints) keep their names
            for block in model.model.layers:
                block.compile()
        parallel.parallelize(model)
        self.autocast = autocast_dtype(cfg.dtype, self.device)
        self.optimizer = build_optimizer(model, cfg)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.flops_per_token = flops_per_token
        self.tokens_per_step = tokens_per_step
        self.peak = peak_flops(self.device, self.autocast, cfg.peak_tflops)  # None: MFU unknown
        if self.peak:  # tokens/s is the whole job's: compare with every device's peak
            self.peak *= parallel.world_size
        self.extra_files = extra_files or {}
        self.step = 0
        self.bad_steps = 0  # consecutive steps with non-finite loss or gradients
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_ROWS)

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
        finite = True
        pipeline = self.parallel.pipeline
        for _ in range(cfg.grad_accum):
            batch = source.next_batch()
            if pipeline:  # the stages compute the loss (LM + MTP + balance) and run forward and backward
                with self.autocast_context():
                    metrics = pipeline.step(batch.to(self.device), pipeline_settings(loss_fn)["mtp_weight"],
                                            1.0 / cfg.grad_accum)
                finite = finite and math.isfinite(metrics["loss"])
            else:
                with self.autocast_context():
                    loss, metrics = loss_fn(model, batch)
                finite = finite and bool(torch.isfinite(loss.detach()))
                (loss / cfg.grad_accum).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else 1e30
        # every rank skips the step or none does; the norm is over all ranks' shards
        finite = self.parallel.all_true(finite)
        grad_norm = self.parallel.finish_gradients(model, max_norm)
        if finite and math.isfinite(grad_norm):
            self.optimizer.step()
            self.parallel.after_optimizer_step()
            self.bad_steps = 0
        else:  # never apply NaN/inf: the weights and the optimizer moments stay as they were
            self.on_nonfinite_step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = self.parallel.mean_metrics(totals)
        totals.update(self.parallel.traffic_metrics(self.tokens_per_step))
        if self.bad_steps == 0:
            totals.update(self.balance_step())
        totals.update(lr=lr, grad_norm=grad_norm, skipped=float(self.bad_steps > 0))
        return totals

    def on_nonfinite_step(self) -> None:
        """Skip this update; with nonfinite=stop, end the run after `nonfinite_patience` bad steps in a row."""
        cfg = self.cfg
        self.bad_steps += 1
        step = self.step + 1
        if cfg.nonfinite == "stop" and self.bad_steps >= cfg.nonfinite_patience:
            last = latest_checkpoint(self.ckpt_dir)
            kept = f"the last checkpoint ({last.name}) is intact" if last else "no checkpoint was written"
            raise UserError(f"training diverged: non-finite loss or gradients at {self.bad_steps} consecutive "
                            f"steps (up to step {step}); stopped without writing a checkpoint or a model, "
                            f"{kept}. Lower lr (now {cfg.lr:g}) or raise warmup_steps")
        if self.bad_steps == 1:
            warn(f"step {step}: non-finite loss or gradients, update skipped"
                 + (f" (the run stops after {cfg.nonfinite_patience} in a row)" if cfg.nonfinite == "stop" else ""))

    @torch.no_grad()
    def balance_step(self) -> dict[str, float]:
        """Bias update (aux-free balancing) after the optimizer step, plus load statistics per MoE layer."""
        cfg = self.cfg
        gamma = 0.0
        if cfg.balance == "aux_free":
            gamma = piecewise(self.step, cfg.max_steps, cfg.bias_gamma, 0.0, 1 - cfg.bias_gamma_off_frac)
        stats: dict[str, float] = {}
        layers = self.model.moe_layers()
        numbers = self.parallel.moe_layer_numbers(self.model)
        per_layer = {}  # layer number -> (max/mean load, share of dead experts, load shares)
        for i, moe in zip(numbers, layers):
            load = moe.update_bias(gamma).float()
            if load.sum() == 0:
                continue
            per_layer[i] = ((load.max() / load.mean()).item(), (load == 0).float().mean().item(),
                            (load / load.sum()).tolist())
        per_layer = self.parallel.gather_layer_stats(per_layer)  # pipeline stages: each holds its own layers
        ratios, dead = [], []
        for i in sorted(per_layer):
            ratio, dead_share, shares = per_layer[i]
            ratios.append(ratio)
            dead.append(dead_share)
            stats[f"load_max_mean/layer{i}"] = ratio
            stats[f"load/layer{i}"] = shares
        if ratios:
            stats["load_max_mean"] = sum(ratios) / len(ratios)
            stats["dead_experts"] = sum(dead) / len(dead)
        return stats

    # ------------------------------------------------------------------ the loop
    def fit(self, source: BatchSource, loss_fn: LossFn, evaluate: Callable[[], dict] | None = None,
            sample: Callable[[], dict] | None = None, resume: bool = False,
            on_state: Callable[[dict], None] | None = None, extra_state: Callable[[], dict] | None = None,
            sample_every: int = 0) -> deque[dict]:
        """Run until cfg.max_steps. `evaluate` (every cfg.eval_every steps) and `sample` (every `sample_every`)
        return metrics to log, both also run at the last step; `extra_state` adds recipe state to
        checkpoints and `on_state` restores it on resume."""
        cfg = self.cfg
        # everything that can refuse the run happens before anything in out_dir is written
        resumed = self.resume(source, on_state) if resume else False
        if not resumed and list_checkpoints(self.ckpt_dir):
            raise UserError(f"{self.out_dir} already holds checkpoints of another run: resume it (--resume) "
                            "or choose a new out_dir")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            write_json(self.out_dir / "train_config.json", cfg.to_dict())
        logger = MetricsLogger(self.out_dir, cfg.tensorboard, resume_step=self.step if resumed else None) \
            if self.main else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {self.out_dir.name}", unit="step",
                   dynamic_ncols=True, disable=os.environ.get("NANOSEEK_NO_PROGRESS") == "1" or not self.main)
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                metrics = self.train_step(source, loss_fn)
                dt = time.perf_counter() - t0
                self.parallel.report_pipeline_memory(self.out_dir)  # pipeline stages: memory held, once
                self.step += 1
                metrics["tokens_per_s"] = self.tokens_per_step / dt
                if self.peak:
                    metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / self.peak
                last = self.step == cfg.max_steps
                if evaluate and (last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                    metrics.update(evaluate())
                if sample and (last or (sample_every and self.step % sample_every == 0)):
                    metrics.update(sample())
                if logger and (self.step % cfg.log_every == 0 or last or "val_loss" in metrics):
                    logger.log(self.step, metrics)
                self.history.append({"step": self.step, **metrics})
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "val_loss", "reward", "lr", "tokens_per_s")
                                 if k in metrics})
                bar.update(1)
                # no periodic checkpoint inside a streak of skipped steps: the newest stays the last good one
                if last or (cfg.save_every and self.step % cfg.save_every == 0 and self.bad_steps == 0):
                    self.save(source, extra_state)
        except RuntimeError as e:
            if not (self.parallel.shards_model and self.parallel.is_peer_failure(e)):
                raise
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise UserError(f"rank {self.parallel.ctx.rank}: lost contact with another rank at step "
                            f"{self.step + 1} ({reason}); stopping. The last complete checkpoint is kept: "
                            "rerun with --resume") from None
        finally:
            bar.close()
            if logger:
                logger.close()
        self.export()
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def save(self, source: BatchSource, extra_state: Callable[[], dict] | None = None) -> Path:
        """Every rank writes its shards of the weights and the optimizer state (torch.distributed.checkpoint);
        rank 0 adds the trainer state and the checksums and renames the directory into place."""
        state = {"step": self.step, "data": source.state_dict(), "rng": rng_state(),
                 "train_config": self.cfg.to_dict(), "extra": extra_state() if extra_state else {}}
        final = self.ckpt_dir / checkpoint_name(self.step)
        if not self.parallel.all_true(self.parallel.local_finite(self.model)):
            raise UserError(f"refusing to write checkpoint {final.name}: the weights hold NaN or inf; the "
                            "training diverged (lower lr or raise warmup_steps)")
        if self.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            remove_partial(self.ckpt_dir)
        try:
            self.parallel.save(final, self.model, self.optimizer, lambda tmp: self.write_beside_shards(tmp, state))
        except WriteError as e:  # e.g. a full disk: the half-written directory goes
            if self.main:
                remove_partial(self.ckpt_dir)
            raise UserError(f"{e}; the previous checkpoints are intact") from None
        if self.main:
            prune(self.ckpt_dir, self.cfg.keep_last)
        self.parallel.barrier()
        return final

    def write_beside_shards(self, folder: Path, state: dict) -> None:
        """Rank 0's part of a checkpoint: the trainer state, and the model's config and tokenizer, so the
        checkpoint also loads as a model (`nanoseek generate --model out_dir/checkpoints/step_...`)."""
        write_trainer_state(folder, state)
        save_config(self.model.config, folder, self.extra_files)

    def resume(self, source: BatchSource, on_state: Callable[[dict], None] | None = None) -> bool:
        """Restore the newest valid checkpoint; False (said on stdout) when out_dir has none."""
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            found = list_checkpoints(self.ckpt_dir)
            if found:
                raise UserError(f"--resume: none of the {len(found)} checkpoints in {self.ckpt_dir} is valid "
                                "(see the warnings above); move them away to start over")
            warn(f"no checkpoint to resume in {self.ckpt_dir}: starting from step 0")
            return False
        state = load_trainer_state(path)
        if is_sharded(path):
            self.parallel.load(path, self.model, self.optimizer)
        else:
            self.load_single_file(path, state)
        try:
            source.load_state_dict(state["data"])
            set_rng_state(state["rng"])
            if on_state:
                on_state(state.get("extra", {}))
        except UserError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"checkpoint {path}: its trainer state does not fit this run "
                            f"({type(e).__name__}: {e})") from None
        if state.get("step") != checkpoint_step(path):
            raise UserError(f"checkpoint {path}: its trainer state is for step {state.get('step')!r}")
        self.step = state["step"]
        if self.main:
            print(f"resumed from {path} (step {self.step})")
        return True

    def load_single_file(self, path: Path, state: dict) -> None:
        """A checkpoint of an earlier nanoseek's single-process format (HF weights + the optimizer in the
        trainer state): it resumes in one process, as it was written."""
        if self.parallel.shards_model:
            raise UserError(f"checkpoint {path} is in the single-process format of an earlier nanoseek: resume "
                            "it in one process (without torchrun and parallel.* settings)")
        load_weights(self.model, path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"checkpoint {path}: its optimizer state does not fit this run "
                            f"({type(e).__name__}: {e})") from None

    def export(self) -> Path:
        """The final model as a self-contained HF directory (weights + config + tokenizer), atomically."""
        final = self.out_dir / "model"
        model = self.parallel.gathered_model(self.model)  # rank 0: one plain model; None elsewhere
        if self.main:
            require_finite(model, f"the final model {final}")
            with atomic_dir(final, what=f"the final model {final}") as tmp:
                save_pretrained(model, tmp, tokenizer_files=self.extra_files, fp8=self.cfg.export_fp8)
        self.parallel.barrier()
        return final


def pipeline_settings(loss_fn: LossFn) -> dict[str, float]:
    """What the pipeline stages need from a recipe whose loss they compute themselves (`mtp_weight`): the
    recipe's loss function carries it as `loss_fn.pipeline_settings()` (pretraining does)."""
    settings = getattr(loss_fn, "pipeline_settings", None)
    if settings is None:
        raise UserError("parallel.pp > 1: only `nanoseek pretrain` trains through pipeline stages")
    return settings()


def print_summary(trainer: Trainer, keys: tuple[str, ...], label: str = "model") -> None:
    """The end-of-run lines every training command prints: the step, the last values of `keys`
    (those that are finite numbers), and where the exported model is."""
    last = trainer.history[-1] if trainer.history else {}
    values = ", ".join(f"{k}={last[k]:.4g}" for k in keys if is_finite_number(last.get(k)))
    print(f"done: step {trainer.step}; {values}")
    print(f"{label}: {trainer.out_dir / 'model'}")

