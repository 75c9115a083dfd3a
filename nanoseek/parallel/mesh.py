"""The process group and the `DeviceMesh` built from a `ParallelConfig`.

Mesh dims, outermost first: `pp` (pipeline stages), `dp_shard` (FSDP2), `ep` (experts). EP is innermost,
so an EP group is consecutive ranks, which fill a node before spilling to the next: the all-to-all stays
inside a node whenever it can. `dp` is `dp_shard x ep` flattened: every rank of a stage reads its own data
and FSDP2 shards the non-expert weights over all of them.

One process is the same code path on a trivial mesh (1 x 1 x 1). A plain `python -m nanoseek ...` run (no
torchrun) gets a 1-rank process group of its own: an in-memory store (no port, no environment variables),
created once and kept for the life of the process, so every training run in it (a demo runs several) takes
the same mesh code as a torchrun job.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nanoseek.errors import UserError
from nanoseek.parallel.config import ParallelConfig

MESH_DIMS = ("pp", "dp_shard", "ep")


@dataclass
class ParallelContext:
    """What a rank knows about the layout once the process group exists."""

    cfg: ParallelConfig
    mesh: DeviceMesh  # (pp, dp_shard, ep)
    dp_mesh: DeviceMesh  # dp_shard x ep flattened: the ranks that split the batch and shard the dense weights
    device: torch.device

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.dp_mesh.size()

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def dp_shard_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp_shard")


def init_parallel(cfg: ParallelConfig, device: torch.device) -> ParallelContext:
    """Create the process group (nccl on CUDA, gloo on CPU; env:// from torchrun) and the mesh.
    The config must have been validated against the world size first (`ParallelConfig.validate`)."""
    backend = cfg.backend_for(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=cfg.timeout_s)
        if cfg.world_size == 1 and "WORLD_SIZE" not in os.environ:
            _init_single_process(backend, timeout)
        else:
            missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise UserError(f"parallel settings need {cfg.world_size} processes started by torchrun "
                                f"(missing ${missing[0]}): torchrun --nproc-per-node {cfg.world_size} -m nanoseek ...")
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (cfg.pp, cfg.dp_shard, cfg.ep), mesh_dim_names=MESH_DIMS)
    dp_mesh = mesh["dp_shard", "ep"]._flatten("dp")  # no public API yet (torch 2.13); torchtitan does the same
    return ParallelContext(cfg, mesh, dp_mesh, device)


_single_process_group = False  # whether this process's group is the 1-rank one made by _init_single_process


def _init_single_process(backend: str, timeout: timedelta) -> None:
    """The 1-rank process group of a run started without torchrun: an in-memory store, no network."""
    global _single_process_group
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    _single_process_group = True
    atexit.register(_destroy_single_process)


def _destroy_single_process() -> None:
    global _single_process_group
    if _single_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _single_process_group = False


def is_single_process() -> bool:
    """Whether the process group is the 1-rank one of a run without torchrun."""
    return _single_process_group


def shutdown() -> None:
    """End of a successful run: wait for every rank, so none tears its connections down while a peer is
    still using them, then destroy the process group. A single process keeps its 1-rank group for the next
    run (it is destroyed at exit)."""
    if dist.is_initialized() and not _single_process_group:
        dist.barrier()
        dist.destroy_process_group()
