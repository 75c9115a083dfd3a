"""`ParallelRuntime`: what a training loop needs from the mesh, in one object.

The trainer (nanoseek.train.core) holds one for every run: a torchrun job's mesh, or the trivial 1-rank mesh
of a single process (nanoseek.parallel.mesh), so one process and many take the same code. The trainer calls
it at the few places where the ranks must agree: laying out the model, finishing the gradients, agreeing on
skipped steps, averaging the logged metrics, checkpoints and the final export. Everything else (the loss, the
optimizer, the schedule) is written once for all of them. On the trivial mesh every collective is a 1-rank
no-op and the model stays unsharded (plain tensors: nothing to gather, nothing to shard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nanoseek.errors import request_hard_exit
from nanoseek.files import write_json
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.parallel import dcp
from nanoseek.parallel.config import ParallelConfig
from nanoseek.parallel.mesh import ParallelContext, init_parallel, is_single_process, shutdown
from nanoseek.parallel.parallelize import finish_gradients, parallelize, parallelize_pipeline
from nanoseek.parallel.pipeline import Pipeline
from nanoseek.parallel.pipeline_trace import memory_lines
from nanoseek.parallel.traffic import TrafficMeter


class ParallelRuntime:
    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.meter = TrafficMeter()
        self.pipeline: Pipeline | None = None  # this rank's stages, when parallel.pp > 1

    @classmethod
    def for_run(cls, cfg: ParallelConfig, device: torch.device) -> "ParallelRuntime":
        """A training run's runtime (cfg validated by the caller): the process group (joined or, in a
        single process without torchrun, created once with one rank) and the mesh."""
        ctx = init_parallel(cfg, device)
        if not is_single_process():
            request_hard_exit()  # see nanoseek.errors.request_hard_exit: no C++ teardown of the process group
        return cls(ctx)

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def dp_rank(self) -> int:
        return self.ctx.dp_rank

    @property
    def dp_size(self) -> int:
        return self.ctx.dp_size

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def shards_model(self) -> bool:
        """Whether the model is split over ranks (FSDP2, EP or pipeline stages): not on the trivial mesh."""
        return self.world_size > 1

    # ------------------------------------------------------------------ a step
    def parallelize(self, model: nn.Module) -> nn.Module:
        """Lay `model` out on the mesh; with pipeline stages it keeps only this rank's (pruned in place)."""
        if self.ctx.cfg.pp > 1:
            self.pipeline = parallelize_pipeline(model, self.ctx, self.meter)
            return model
        return parallelize(model, self.ctx, self.meter)

    def finish_gradients(self, model: nn.Module, max_norm: float) -> float:
        return finish_gradients(model, self.ctx, max_norm, self.pipeline)

    def after_optimizer_step(self) -> None:
        """Weights that live on two stages (the embedding mirror) take the updated values."""
        if self.pipeline is not None:
            self.pipeline.refresh_mirror()

    def report_pipeline_memory(self, out_dir: Path | None = None) -> list[dict]:
        """Once, after the first step: every pipeline rank's parameters and activations held per stage, measured
        and as the schedule plans them (nanoseek.parallel.pipeline); rank 0 prints one line per pipeline rank
        and writes them to `out_dir/pipeline_memory.json`. Stops the measuring."""
        if self.pipeline is None or not self.pipeline.tracker.active:
            return []
        self.pipeline.tracker.active = False
        mine = self.pipeline.memory_report() if self.dp_rank == 0 else None
        self.pipeline.tracker.clear()
        reports: list = [None] * self.world_size
        dist.all_gather_object(reports, mine)
        reports = [r for r in reports if r is not None]
        if self.is_main:
            for line in memory_lines(reports):
                print(line)
            if out_dir is not None:
                write_json(out_dir / "pipeline_memory.json", reports)
        return reports

    def moe_layer_numbers(self, model: nn.Module) -> list[int]:
        """The position of each of `model.moe_layers()` among the whole model's MoE layers (with pipeline
        stages a rank holds some of them only)."""
        layers = model.moe_layers()
        if self.pipeline is None:
            return list(range(len(layers)))
        cfg = model.config
        names = [f"model.layers.{i}.mlp" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        names += [f"mtp.{k}.block.mlp" for k in range(cfg.num_nextn_predict_layers)
                  if cfg.is_moe_layer(cfg.num_hidden_layers + k)]
        by_module = {id(m): n for n, m in model.named_modules()}
        return [names.index(by_module[id(m)]) for m in layers]

    def gather_layer_stats(self, stats: dict[int, tuple[float, float, list[float]]]) -> dict[int, tuple]:
        """Per-MoE-layer statistics of every pipeline stage (each stage computed its own layers')."""
        if self.pipeline is None:
            return stats
        parts: list = [None] * dist.get_world_size(self.pipeline.group)
        dist.all_gather_object(parts, stats, group=self.pipeline.group)
        return {k: v for part in parts for k, v in part.items()}

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (a step is skipped everywhere or nowhere)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() == 1.0)

    @torch.no_grad()
    def local_finite(self, model: nn.Module) -> bool:
        """Whether this rank's shards of the weights and the buffers are all finite (combine with
        `all_true`)."""
        tensors = [*model.parameters(), *model.buffers()]
        return all(bool(torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all())
                   for t in tensors if t.is_floating_point())

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Scalar metrics averaged over the data-parallel ranks (each saw its own part of the batch)."""
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        if not keys:
            return metrics
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.ctx.dp_mesh.get_group())
        return {**metrics, **{k: float(v) / self.dp_size for k, v in zip(keys, t.tolist())}}

    def traffic_metrics(self, tokens: int) -> dict[str, float]:
        """The EP all-to-all dispatch bytes of the step, summed over ranks, per place and per token
        (combine sends as many back), and the most nodes any token's experts spanned."""
        if self.ctx.cfg.ep == 1:
            return {}
        t = self.meter.take()
        places = ("self_bytes", "intra_node_bytes", "cross_node_bytes", "cross_node_dedup_bytes")
        sums = torch.tensor([t.get(k, 0.0) for k in places], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        most = torch.tensor([t.get("max_nodes_per_token", 0.0)], device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        out = {f"a2a_{k}": float(v) for k, v in zip(places, sums.tolist())}
        out.update({f"a2a_{k.removesuffix('_bytes')}_bytes_per_token": float(v) / max(1, tokens)
                    for k, v in zip(places, sums.tolist())})
        out["a2a_max_nodes_per_token"] = float(most.item())
        return out

    # ------------------------------------------------------------------ checkpoints and export
    def save(self, final: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             write_extra: Callable[[Path], None]) -> Path:
        return dcp.save_sharded(final, model, optimizer, write_extra)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        dcp.load_sharded(path, model, optimizer)
        self.after_optimizer_step()  # the mirror copies the loaded embedding

    def gathered_model(self, model: DeepseekV3ForCausalLM) -> DeepseekV3ForCausalLM | None:
        """The whole model as one plain module on rank 0 (every pipeline stage's and every rank's shards
        gathered), None elsewhere. On the trivial mesh that is `model` itself: nothing to gather."""
        if not self.shards_model:
            return model
        state = self.pipeline.full_state() if self.pipeline is not None else dcp.full_model_state(model)
        if not self.is_main:
            return None
        whole = DeepseekV3ForCausalLM(model.config)
        whole.load_state_dict(state)
        return whole

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (e.g. whether a checkpoint was found)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item() == 1.0)

    @staticmethod
    def is_peer_failure(error: BaseException) -> bool:
        """Whether `error` is a collective that failed because another rank died or stopped answering:
        torch's DistError family (NCCL), or a RuntimeError raised from inside gloo."""
        return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error))

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        shutdown()
