"""The parallel layout of a training job, in the vocabulary of `parallel.*` (nanoseek.parallel.config):
the GPUs form a mesh (pp, dp_shard, ep): `pp` pipeline stages run a `schedule`; within a stage the
routed experts are split over `ep` ranks and every rank reads its own data, so data parallelism is
dp = dp_shard x ep ways (EP ranks are data-parallel for everything but the experts, as in DeepSeek-V3),
and each expert has dp_shard replicas. ZeRO stage `zero` (3 = FSDP) shards the dense state over all dp
ranks and the expert state over its dp_shard replicas. Also micro-batches, sequence length, precision
and activation recomputation. `resolve` checks it against a model and a cluster (one clear
error per inconsistency) and derives the degrees and which pipeline chunks each device holds."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

from nanoseek.cost import arch
from nanoseek.cost.models import as_dict
from nanoseek.errors import UserError, require
from nanoseek.plan.blocks import ACTIVATION_PROFILES, ATTENTION_KERNELS, RECOMPUTE, Block
from nanoseek.plan.cluster import Cluster
from nanoseek.plan.precision import RECIPES

SCHEDULES = ("1f1b", "interleaved_1f1b", "zb1p", "zbv", "dualpipe", "dualpipev")
DUAL = ("dualpipe", "dualpipev")  # schedules that overlap one micro-batch's forward with another's backward


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    ep: int = 1
    dp_shard: int | None = None     # mesh dim: GPUs = pp x dp_shard x ep; None = derived from the GPU count
    zero: int = 1                   # 0 none, 1 optimizer states, 2 + gradients, 3 + parameters (FSDP)
    schedule: str = "1f1b"
    virtual_stages: int = 2         # chunks per device for interleaved_1f1b
    micro_batch: int = 1            # sequences per micro-batch
    global_batch: int | None = None  # sequences per optimizer step over all replicas; None = dp x micro_batch x pp-min
    seq_len: int = 4096
    precision: str = "bf16"
    recompute: str = "none"
    node_limit: int | None = None   # M: nodes a token's experts may span; None = the model's topk_group when its
                                    # expert groups map onto the EP nodes, 0 = no limit
    mtp: bool = True                # train the model's MTP modules
    activations: str = "nanoseek"   # which tensors are kept for the backward: nanoseek | v3 (plan/blocks.py)
    attention: str = "fused"        # attention kernel: fused (FlashAttention-style) | math (torch's CPU SDPA)
    split: str = "balanced"         # layers per pipeline chunk: balanced (by forward time, head and MTP counted) | even

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Resolved:
    """A layout checked against a model and a cluster, with everything derived from it."""
    layout: Layout
    dp: int                 # data-parallel degree of the dense weights (GPUs per pipeline stage) = dp_shard x ep
    dp_shard: int           # replicas of each expert (dp / ep): its ZeRO/FSDP state is sharded over them
    n_micro: int            # micro-batches per optimizer step per pipeline
    global_batch: int
    n_chunks: int
    device_chunks: tuple[tuple[int, ...], ...]  # device -> the chunks it holds
    chunk_blocks: tuple[tuple[int, ...], ...]   # chunk -> indices into the model's blocks
    ep_nodes: int           # nodes one EP group spans
    ep_gpus_per_node: int   # GPUs of one EP group within a node
    node_limit: int         # nodes a token's copies may reach (after routing limits)


def n_chunks(layout: Layout) -> int:
    if layout.schedule == "interleaved_1f1b":
        return layout.pp * layout.virtual_stages
    if layout.schedule in ("zbv", "dualpipev"):
        return 2 * layout.pp
    return layout.pp


def device_chunks(layout: Layout) -> tuple[tuple[int, ...], ...]:
    """Interleaved: device r holds chunks r, r + pp, ...; V shapes (zbv, dualpipev): r and 2pp-1-r;
    DualPipe: stage r of one direction and stage pp-1-r of the other (two full copies of the model)."""
    pp = layout.pp
    if layout.schedule == "interleaved_1f1b":
        return tuple(tuple(r + j * pp for j in range(layout.virtual_stages)) for r in range(pp))
    if layout.schedule in ("zbv", "dualpipev"):
        return tuple((r, 2 * pp - 1 - r) for r in range(pp))
    if layout.schedule == "dualpipe":
        return tuple((r, pp - 1 - r) for r in range(pp))
    return tuple((r,) for r in range(pp))


def split_layers(n_layers: int, chunks: int) -> list[int]:
    """Decoder layers per chunk: even, the remainder to the inner chunks first (the first chunk also
    holds the embedding, the last the output head and the MTP modules), then the first, then the last."""
    counts = [n_layers // chunks] * chunks
    order = list(range(1, chunks - 1)) + [0, chunks - 1] if chunks > 2 else list(range(chunks))
    for i in order[: n_layers % chunks]:
        counts[i] += 1
    return counts


@functools.lru_cache(maxsize=256)  # a sweep asks for the same few splits many times
def balanced_layers(costs: tuple[float, ...], chunks: int, first_extra: float, last_extra: float) -> list[int]:
    """Decoder layers per chunk (contiguous, at least one each) minimising the costliest chunk, where
    chunk 0 also carries `first_extra` and the last chunk `last_extra` (the output head, the MTP
    modules). Exact dynamic programme over the split points."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: the smallest possible max cost of splitting layers[:i] into j chunks
    best = [[inf] * (n + 1) for _ in range(chunks + 1)]
    cut = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = 0.0
    for j in range(1, chunks + 1):
        extra = (first_extra if j == 1 else 0.0) + (last_extra if j == chunks else 0.0)
        for i in range(j, n - (chunks - j) + 1):
            for s in range(j - 1, i):
                cost = max(best[j - 1][s], prefix[i] - prefix[s] + extra)
                if cost < best[j][i]:
                    best[j][i], cut[j][i] = cost, s
    counts, i = [], n
    for j in range(chunks, 0, -1):
        counts.append(i - cut[j][i])
        i = cut[j][i]
    return counts[::-1]


def chunk_blocks(bl: list[Block], chunks: int, split: str = "even",
                 high_weight: float = 1.0) -> tuple[tuple[int, ...], ...]:
    """Block indices per chunk: blocks before the first layer go to chunk 0, after the last to the last.
    "balanced" weighs each block by its forward time in units of low-precision GEMM FLOPs: the FLOPs kept
    in high precision (attention core, router, head) count `high_weight` times (2 under FP8)."""
    layer_ids = [i for i, b in enumerate(bl) if b.layer]
    if split == "balanced":
        def cost(b: Block) -> float:
            return b.gemm_flops + high_weight * (b.high_mm_flops + b.core_flops)

        first = sum(cost(b) for b in bl[:layer_ids[0]])
        last = sum(cost(b) for b in bl[layer_ids[-1] + 1:])
        counts = list(balanced_layers(tuple(cost(bl[i]) for i in layer_ids), chunks, first, last))
    else:
        counts = split_layers(len(layer_ids), chunks)
    out: list[list[int]] = [[] for _ in range(chunks)]
    start = 0
    for c, n in enumerate(counts):
        out[c] = layer_ids[start:start + n]
        start += n
    out[0] = [i for i in range(layer_ids[0])] + out[0]
    out[-1] = out[-1] + [i for i in range(layer_ids[-1] + 1, len(bl))]
    return tuple(tuple(c) for c in out)


def _min_micro(layout: Layout) -> int:
    return 2 * layout.pp if layout.schedule in ("zbv", "dualpipe", "dualpipev") else layout.pp


def resolve(layout: Layout, cfg: Any, cl: Cluster, bl: list[Block]) -> Resolved:
    """Check `layout` against the model and the cluster; one UserError naming the setting."""
    c = dict(as_dict(cfg))
    a = arch(c)
    lo = layout
    for name in ("pp", "ep", "micro_batch", "seq_len", "virtual_stages"):
        value = getattr(lo, name)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"--{name.replace('_', '-')}",
                value, "a positive integer")
    require(lo.schedule in SCHEDULES, "--schedule", lo.schedule, "one of " + ", ".join(SCHEDULES))
    require(lo.precision in RECIPES, "--precision", lo.precision, "one of " + ", ".join(RECIPES))
    require(lo.recompute in RECOMPUTE, "--recompute", lo.recompute, "one of " + ", ".join(RECOMPUTE))
    require(lo.activations in ACTIVATION_PROFILES, "--activations", lo.activations,
            "one of " + ", ".join(ACTIVATION_PROFILES))
    require(lo.attention in ATTENTION_KERNELS, "--attention", lo.attention, "one of " + ", ".join(ATTENTION_KERNELS))
    require(lo.split in ("even", "balanced"), "--split", lo.split, "even or balanced")
    require(lo.zero in (0, 1, 2, 3), "--zero", lo.zero, "0, 1, 2 or 3 (3 = FSDP)")
    if cl.n_gpus % lo.pp:
        raise UserError(f"--pp {lo.pp} does not divide the {cl.n_gpus} GPUs")
    dp = cl.n_gpus // lo.pp
    chunks = n_chunks(lo)
    if chunks > len(a.layers):
        raise UserError(f"{chunks} pipeline chunks ({lo.schedule}, pp={lo.pp}) for {len(a.layers)} decoder "
                        "layers: more stages than layers")
    if lo.schedule == "dualpipe" and lo.pp % 2:
        raise UserError(f"dualpipe needs an even --pp (got {lo.pp}): it pairs stage r with stage pp-1-r")
    if lo.schedule == "interleaved_1f1b" and lo.pp == 1:
        raise UserError("interleaved_1f1b needs --pp >= 2")
    experts = c.get("n_routed_experts") or 0
    if lo.ep > 1:
        if not experts:
            raise UserError(f"--ep {lo.ep}: the model has no routed experts")
        if experts % lo.ep:
            raise UserError(f"--ep {lo.ep} does not divide the {experts} routed experts")
        if dp % lo.ep:
            raise UserError(f"--ep {lo.ep} does not divide the data-parallel degree {dp} "
                            f"({cl.n_gpus} GPUs / pp {lo.pp}): expert parallelism borrows data-parallel ranks")
    if lo.dp_shard is not None and lo.pp * lo.dp_shard * lo.ep != cl.n_gpus:
        raise UserError(f"pp {lo.pp} x dp_shard {lo.dp_shard} x ep {lo.ep} = {lo.pp * lo.dp_shard * lo.ep} is not "
                        f"the {cl.n_gpus} GPUs (leave --dp-shard out to derive it)")
    per_replica = lo.micro_batch * dp
    if lo.global_batch is None:
        n_micro = max(_min_micro(lo), 1)
    else:
        require(isinstance(lo.global_batch, int) and lo.global_batch >= 1, "--global-batch", lo.global_batch,
                "a positive integer")
        if lo.global_batch % per_replica:
            raise UserError(f"--global-batch {lo.global_batch} is not a multiple of micro-batch {lo.micro_batch} "
                            f"x data-parallel degree {dp}")
        n_micro = lo.global_batch // per_replica
    if lo.pp > 1 and n_micro < _min_micro(lo):
        raise UserError(f"{lo.schedule} with pp={lo.pp} needs at least {_min_micro(lo)} micro-batches per step, "
                        f"got {n_micro} (raise --global-batch or lower --micro-batch)")
    if lo.schedule == "interleaved_1f1b" and n_micro % lo.pp:
        raise UserError(f"interleaved_1f1b needs micro-batches ({n_micro}) divisible by pp ({lo.pp})")
    if lo.seq_len > (c.get("max_position_embeddings") or lo.seq_len):
        raise UserError(f"--seq-len {lo.seq_len} exceeds the model's max_position_embeddings "
                        f"{c['max_position_embeddings']}")
    g = min(lo.ep, cl.gpus_per_node)
    ep_nodes = -(-lo.ep // cl.gpus_per_node)
    limit = _node_limit(lo, c, ep_nodes)
    return Resolved(lo, dp, dp // lo.ep, n_micro, n_micro * per_replica, chunks,
                    device_chunks(lo), chunk_blocks(bl, chunks, lo.split, _high_weight(cl, lo)), ep_nodes, g, limit)


def _high_weight(cl: Cluster, lo: Layout) -> float:
    """How many low-precision GEMM FLOPs one high-precision FLOP costs in time (2 for FP8 on H800)."""
    p = RECIPES[lo.precision]
    low, high = cl.peak_tflops.get(p.gemm_peak), cl.peak_tflops.get(p.high_peak)
    return low / high if low and high else 1.0


def _node_limit(lo: Layout, c: dict[str, Any], ep_nodes: int) -> int:
    """Nodes a token's K copies may reach. Node-limited routing (DeepSeek-V3 report §2.1.2) applies when
    the model's expert groups map one-to-one onto the EP group's nodes (n_group == nodes): then at most
    topk_group nodes. --node-limit M sets it (it must fit the routing), 0 lifts it."""
    k = c.get("num_experts_per_tok") or 0
    if lo.node_limit is not None:
        require(isinstance(lo.node_limit, int) and lo.node_limit >= 0, "--node-limit", lo.node_limit,
                "a non-negative integer (0 = no limit)")
        return min(k, ep_nodes) if lo.node_limit == 0 else min(lo.node_limit, k, ep_nodes)
    if ep_nodes > 1 and c.get("n_group", 1) == ep_nodes and c.get("topk_method", "noaux_tc") != "greedy":
        return min(c.get("topk_group", ep_nodes), k, ep_nodes)
    return min(k, ep_nodes)
