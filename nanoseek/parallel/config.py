"""`ParallelConfig`: how the ranks of a `torchrun` job are laid out, checked before any process group.

The world is a 3-D mesh `(pp, dp_shard, ep)` (nanoseek.parallel.mesh):
  pp        pipeline ranks: the model is cut into stages run by `schedule` over `microbatches` micro-batches
            (nanoseek.parallel.pipeline; 1f1b has one stage per pipeline rank, interleaved_1f1b, zbv and
            dualpipev two: in a loop, or in a V that puts the first and the last stage on the same rank),
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
# pipeline schedule -> (stages per pipeline rank, placement of the stages on the ranks)
SCHEDULES = {"1f1b": (1, "loop"), "interleaved_1f1b": (2, "loop"), "zbv": (2, "v"), "dualpipev": (2, "v")}


@dataclass
class ParallelConfig:
    dp_shard: int = 1  # FSDP2 degree
    ep: int = 1  # expert-parallel degree
    pp: int = 1  # pipeline ranks (stages = pp x the schedule's stages per rank)
    schedule: str = "1f1b"  # pipeline schedule: 1f1b | interleaved_1f1b | zbv | dualpipev (with pp > 1)
    microbatches: int = 0  # micro-batches per pipeline step (0: the fewest the schedule needs)
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
    def stages_per_rank(self) -> int:
        return SCHEDULES[self.schedule][0] if self.pp > 1 else 1

    @property
    def stages(self) -> int:
        """Pipeline stages: pp x the schedule's stages per rank."""
        return self.pp * self.stages_per_rank

    @property
    def v_shape(self) -> bool:
        """Whether the stages sit on the ranks in a V (rank r: stages r and 2pp-1-r), so the first and the
        last stage share rank 0."""
        return self.pp > 1 and SCHEDULES[self.schedule][1] == "v"

    @property
    def min_microbatches(self) -> int:
        """What the schedule needs to fill the pipeline: 1F1B one per rank; the two-stage-per-rank schedules
        one per stage (torch's DualPipeV requires it; ZBV and interleaved are sized the same way here)."""
        return 1 if self.pp == 1 else self.pp if self.schedule == "1f1b" else self.stages

    @property
    def n_microbatches(self) -> int:
        return self.microbatches or self.min_microbatches

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
        require(self.schedule in SCHEDULES, "parallel.schedule", self.schedule, ", ".join(SCHEDULES))
        require(isinstance(self.microbatches, int) and self.microbatches >= 0, "parallel.microbatches",
                self.microbatches, "an integer >= 0 (0: the fewest the schedule needs)")
        if self.pp == 1 and (self.microbatches or self.schedule != "1f1b"):
            raise SettingError(f"parallel.schedule={self.schedule} / parallel.microbatches={self.microbatches} "
                               "apply to pipeline stages only: set parallel.pp > 1 (or leave them unset)")
        if self.pp > 1 and self.microbatches:
            need = self.min_microbatches
            require(self.microbatches >= need, "parallel.microbatches", self.microbatches,
                    f">= {need}: {self.schedule} with pp={self.pp} needs at least "
                    + ("one micro-batch per pipeline rank" if self.schedule == "1f1b" else
                       f"one micro-batch per stage ({self.stages} stages)"))
            require(self.microbatches % self.pp == 0 or self.schedule != "interleaved_1f1b",
                    "parallel.microbatches", self.microbatches,
                    f"a multiple of pp={self.pp} for interleaved_1f1b (whole rounds of micro-batches)")
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
        if self.pp > 1:
            require(self.stages <= model.num_hidden_layers, "parallel.pp", self.pp,
                    f"at most {model.num_hidden_layers // self.stages_per_rank}: {self.schedule} cuts the model "
                    f"into {self.stages_per_rank} x pp stages, and each needs at least one of the "
                    f"{model.num_hidden_layers} blocks")
            require(not model.tie_word_embeddings, "parallel.pp", self.pp,
                    "1 with model.tie_word_embeddings=true (a tied head is not supported across stages)")
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


    def validate_batch(self, batch_size: int) -> None:
        """Each data-parallel rank's rows must split into the pipeline's micro-batches."""
        if self.pp == 1:
            return
        rows = batch_size // self.data_parallel
        n = self.n_microbatches
        require(rows % n == 0, "batch_size", batch_size,
                f"a multiple of data-parallel ranks x micro-batches = {self.data_parallel} x {n} "
                f"(parallel.microbatches; {self.schedule} with pp={self.pp} needs at least {self.min_microbatches})")


def launched_world_size() -> int:
    """The number of processes torchrun started ($WORLD_SIZE), 1 without torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SettingError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None
