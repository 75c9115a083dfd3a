"""The process group and the `DeviceMesh` built from a `ParallelConfig`.

Mesh dims, outermost first: `pp` (pipeline stages), `dp_shard` (FSDP2), `ep` (experts). EP is innermost,
so an EP group is consecutive ranks, which fill a node before spilling to the next: the all-to-all stays
inside a node whenever it can. `dp` is `dp_shard x ep` flattened: every rank of a stage reads its own data
and FSDP2 shards the non-expert weights over all of them.
"""

from __future__ import annotations

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
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UserError(f"parallel settings need {cfg.world_size} processes started by torchrun "
                            f"(missing ${missing[0]}): torchrun --nproc-per-node {cfg.world_size} -m nanoseek ...")
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s),
                                device_id=device if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (cfg.pp, cfg.dp_shard, cfg.ep), mesh_dim_names=MESH_DIMS)
    dp_mesh = mesh["dp_shard", "ep"]._flatten("dp")  # no public API yet (torch 2.13); torchtitan does the same
    return ParallelContext(cfg, mesh, dp_mesh, device)


def shutdown() -> None:
    """End of a successful run: wait for every rank, so none tears its connections down while a peer is
    still using them, then destroy the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
