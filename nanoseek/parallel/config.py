"""`ParallelConfig`: how the ranks of a `torchrun` job are laid out, checked before any process group.

The world is a 3-D mesh `(pp, dp_shard, ep)` (nanoseek.parallel.mesh):
  pp        pipeline stages (reserved: 1 until pipeline parallelism lands; the mesh already has the dim),
  dp_shard  FSDP2 sharding of every non-expert weight, its gradients and its optimizer state,
  ep        expert parallelism: the routed experts of each MoE layer are split over `ep` ranks.
Every rank of one pipeline stage reads its own part of the batch: data parallelism is `dp_shard * ep`
ways (EP ranks are data-parallel for attention, shared experts and dense layers, as in DeepSeek-V3).

`nodes` says how many machines the job spans (torchrun `--nnodes`); on one machine a value > 1 simulates
nodes as groups of consecutive ranks, so the node-limited routing and the cross-node traffic accounting can
be tested without a cluster. `node_limited=true` asks that every token reach experts on at most
`topk_group` nodes (DeepSeek-V3 technical report, §2.1.2 and §3.2.2): the model's expert groups must then be
the EP nodes (`n_group` = number of nodes the EP group spans).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from nanoseek.config import ModelConfig
from nanoseek.errors import SettingError, require

BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class ParallelConfig:
    dp_shard: int = 1  # FSDP2 degree
    ep: int = 1  # expert-parallel degree
    pp: int = 1  # pipeline stages (reserved; must be 1 for now)
    nodes: int = 1  # machines the job spans (> 1 on one machine: simulated as groups of consecutive ranks)
    node_limited: bool = False  # require each token's experts on at most topk_group nodes (n_group = EP nodes)
    overlap: bool = False  # MoE blocks interleave two halves of each micro-batch to hide the EP all-to-all (overlap.py)
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: float = 120.0  # a collective waiting longer than this fails the job (a dead rank never hangs it)

    # ------------------------------------------------------------------ derived sizes
    @property
    def world_size(self) -> int:
        return self.pp * self.dp_shard * self.ep

    @property
    def data_parallel(self) -> int:
        """Ranks of one pipeline stage: each reads its own part of the batch."""
        return self.dp_shard * self.ep

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nodes

    @property
    def ep_nodes(self) -> int:
        """Nodes one EP group spans (EP ranks are consecutive, so they fill a node before the next)."""
        return max(1, self.ep // self.ranks_per_node)

    def backend_for(self, device_type: str) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if device_type == "cuda" else "gloo"

    # ------------------------------------------------------------------ validation
    def validate(self, model: ModelConfig | None = None, world_size: int | None = None,
                 device_type: str = "cpu") -> None:
        """Every inconsistency is one SettingError, raised before any process group exists.
        `world_size`: the processes torchrun started (default: $WORLD_SIZE, else 1)."""
        for name in ("dp_shard", "ep", "pp", "nodes"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"parallel.{name}", value, "an integer >= 1")
        require(self.pp == 1, "parallel.pp", self.pp, "1 (pipeline parallelism is not implemented yet)")
        require(self.backend in BACKENDS, "parallel.backend", self.backend, "auto, gloo or nccl")
        require(math.isfinite(self.timeout_s) and self.timeout_s > 0, "parallel.timeout_s", self.timeout_s,
                "a number of seconds > 0")
        world = launched_world_size() if world_size is None else world_size
        if self.world_size != world:
            raise SettingError(f"parallel.pp x parallel.dp_shard x parallel.ep = {self.pp} x {self.dp_shard} x "
                               f"{self.ep} = {self.world_size}, but {world} process(es) were started "
                               f"(torchrun --nproc-per-node x --nnodes must equal it)")
        require(self.world_size % self.nodes == 0, "parallel.nodes", self.nodes,
                f"a divisor of the world size {self.world_size}")
        rpn = self.ranks_per_node
        require(self.ep % rpn == 0 or rpn % self.ep == 0, "parallel.ep", self.ep,
                f"a multiple or a divisor of the ranks per node ({rpn}), so an EP group fills whole nodes")
        if self.backend_for(device_type) == "nccl" and device_type != "cuda":
            raise SettingError(f"parallel.backend = 'nccl' needs CUDA devices, the device is {device_type}")
        if model is not None:
            self.validate_model(model)

    def validate_model(self, model: ModelConfig) -> None:
        if self.ep > 1:
            require(model.n_routed_experts > 0, "parallel.ep", self.ep, "1: the model has no routed experts")
            require(model.n_routed_experts % self.ep == 0, "parallel.ep", self.ep,
                    f"a divisor of the routed experts ({model.n_routed_experts})")
        if self.node_limited:
            nodes = self.ep_nodes
            if self.ep == 1 or nodes < 2:
                raise SettingError(f"parallel.node_limited needs an EP group spanning >= 2 nodes; ep={self.ep} over "
                                   f"{self.nodes} node(s) spans {nodes}")
            if model.topk_method == "greedy" or model.n_group != nodes:
                raise SettingError(f"parallel.node_limited: the expert groups must be the EP nodes: set "
                                   f"model.n_group={nodes} (the EP group spans {nodes} nodes), got "
                                   f"n_group={model.n_group} with topk_method={model.topk_method!r}")


def launched_world_size() -> int:
    """The number of processes torchrun started ($WORLD_SIZE), 1 without torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SettingError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None
