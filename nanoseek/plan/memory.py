"""Per-GPU memory of a training layout: parameters, gradients, optimizer states (sharded as the ZeRO
stage says), activations held as the pipeline schedule implies, communication buffers, and a reserve.

Activations in flight per device, in micro-batches of that device's layers (DualPipe paper's table,
github.com/deepseek-ai/DualPipe; Narayanan et al. 2021 for interleaving; Qi et al. 2023 for ZB):
1F1B and ZB1P: device r of pp holds pp - r; interleaved 1F1B: pp x (1 + (pp-1)/(pp x v)) on the
first device (used for all); ZB-V: pp (as 1F1B); DualPipe: pp + 1 (and two copies of the
parameters: each device holds a stage of each direction); DualPipeV: 2pp + 1 chunks of half a
device's layers. The loss's logits and log-probabilities are held for one micro-batch: every schedule
runs the last chunk's backward right after its forward. The backward's workspace is the gradient of
the largest block's kept activations, one more copy of the largest single tensor (an op's backward
holds the gradients of its output and its input at once), and the logits' gradient."""

from __future__ import annotations

from typing import Any

from nanoseek.plan.blocks import Block, act_bytes_per_token
from nanoseek.plan.cluster import Cluster
from nanoseek.plan.layout import DUAL, Resolved
from nanoseek.plan.precision import Precision

DP_BUCKET_BYTES = 2 * 25e6  # two gradient buckets in flight (torch DDP's default bucket: 25 MB)


def act_sizes(p: Precision, profile: str = "nanoseek") -> dict[str, float]:
    """Bytes per kept element by kind; the "v3" profile caches MoE SwiGLU inputs like linear inputs."""
    return {"act": p.act_bytes, "linear_in": p.linear_in_bytes, "fp32": 4, "index": 8,
            "swiglu_in": p.linear_in_bytes if profile == "v3" else p.act_bytes}


def micro_batches_held(r: Resolved, device: int) -> float:
    """Micro-batches of activations device `device` holds at its peak, in units of its own layers."""
    lo, pp = r.layout, r.layout.pp
    if pp == 1:
        return 1.0
    if lo.schedule in ("1f1b", "zb1p"):
        return float(pp - device)
    if lo.schedule == "interleaved_1f1b":
        return pp * (1 + (pp - 1) / (pp * lo.virtual_stages))
    if lo.schedule == "zbv":
        return float(pp)
    if lo.schedule == "dualpipe":
        return pp + 1.0
    return (2 * pp + 1) / 2  # dualpipev: 2pp + 1 chunks, each half of the device's layers


def _device_blocks(r: Resolved, device: int) -> list[int]:
    return [i for c in r.device_chunks[device] for i in r.chunk_blocks[c]]


def state_bytes(bl: list[Block], r: Resolved, p: Precision, mine: list[int]) -> dict[str, float]:
    """Weights, gradients and optimizer state (master + two moments), sharded as the ZeRO stage says."""
    lo = r.layout
    dense = sum(bl[i].dense_params for i in mine)
    expert = sum(bl[i].expert_params for i in mine) / lo.ep
    full = dense + expert
    sharded = dense / r.dp + expert / r.dp_shard  # this device's share of a sharded piece
    return {
        "weights": (sharded if lo.zero >= 3 else full) * p.weight_bytes,
        "gradients": (sharded if lo.zero >= 2 else full) * p.grad_bytes,
        "optimizer": (sharded if lo.zero >= 1 else full) * (p.master_bytes + 2 * p.moment_bytes),
    }


def activation_bytes(bl: list[Block], r: Resolved, p: Precision, mine: list[int], held: float) -> dict[str, float]:
    """Activations of `held` micro-batches, the loss's for one, and the backward's workspace."""
    lo = r.layout
    tokens = lo.micro_batch * lo.seq_len
    sizes = act_sizes(p, lo.activations)
    kept_mode = "none" if lo.recompute == "full" else lo.recompute
    per_block = {i: act_bytes_per_token(bl[i], kept_mode, sizes, profile=lo.activations) for i in mine}
    largest = max(per_block.values(), default=0.0)
    if lo.recompute == "full":  # each layer keeps its input; one layer's full set lives during its recompute
        per_token, transient = sum(_layer_input(bl[i], sizes) for i in mine), largest
    else:
        per_token, transient = sum(per_block.values()), 0.0
    if lo.schedule == "dualpipe":  # pp + 1 micro-batches of a stage: the mean of the device's two stages
        per_token /= 2
    loss = max((act_bytes_per_token(bl[i], "none", sizes, loss=True) for i in mine), default=0.0)
    # the backward materialises the gradient of each kept activation of the block it is in (one block's
    # worth at a time: the largest), an op holds its output's and its input's gradient at once (one more
    # copy of the largest tensor), and the logits' gradient (fp32) lives on the device with the loss
    biggest = max((a.elements * sizes[a.kind] for i in mine for a in bl[i].acts if not a.loss), default=0.0)
    vocab = max((a.elements for i in mine for a in bl[i].acts if a.loss), default=0.0)
    return {"activations": (held * per_token + transient) * tokens, "loss (logits, log-probs)": loss * tokens,
            "backward workspace": (largest + biggest + 4 * vocab) * tokens}


def buffer_bytes(bl: list[Block], r: Resolved, p: Precision, mine: list[int]) -> dict[str, float]:
    """Communication buffers: one micro-batch's expert dispatch/combine (two in flight when DualPipe
    overlaps them), pipeline send/recv, data-parallel buckets or FSDP's gathered weights (two blocks)."""
    lo = r.layout
    tokens = lo.micro_batch * lo.seq_len
    d, k = bl[0].hidden, max(b.top_k for b in bl)
    a2a = 0.0
    if lo.ep > 1 and any(bl[i].moe for i in mine):
        a2a = tokens * k * d * (p.dispatch_bytes + p.combine_bytes) * (2 if lo.schedule in DUAL else 1)
    if lo.zero >= 3:
        dp = 2 * max(bl[i].dense_params + bl[i].expert_params / lo.ep for i in mine) * p.weight_bytes
    else:
        dp = DP_BUCKET_BYTES if r.dp > 1 else 0.0
    return {"EP dispatch/combine buffers": a2a,
            "PP send/recv buffers": 2 * 2 * tokens * d * p.act_bytes if lo.pp > 1 else 0.0,
            "DP buckets / FSDP gathers": dp}


def device_memory(bl: list[Block], r: Resolved, p: Precision, reserve_gb: float, device: int) -> dict[str, float]:
    """Bytes on device `device` by category, their `total`, and the parameters and micro-batches it holds."""
    mine = _device_blocks(r, device)
    held = micro_batches_held(r, device)
    out = {**state_bytes(bl, r, p, mine), **activation_bytes(bl, r, p, mine, held), **buffer_bytes(bl, r, p, mine),
           "reserve (CUDA context, NCCL, fragmentation)": reserve_gb * 1e9}
    out["total"] = sum(out.values())
    out["params_on_device"] = sum(bl[i].dense_params + bl[i].expert_params / r.layout.ep for i in mine)
    out["micro_batches_held"] = held
    return out


def _layer_input(b: Block, sizes: dict[str, float]) -> float:
    """Full recomputation keeps a decoder layer's input (the residual stream) and nothing else."""
    return b.hidden * sizes["act"] if b.layer else act_bytes_per_token(b, "none", sizes)  # MTP: all kept


def memory(bl: list[Block], r: Resolved, p: Precision, cl: Cluster, reserve_gb: float) -> dict[str, Any]:
    """Every device's memory; the worst one decides whether the layout fits."""
    devices = [device_memory(bl, r, p, reserve_gb, d) for d in range(r.layout.pp)]
    worst = max(range(len(devices)), key=lambda d: devices[d]["total"])
    return {"worst_device": worst, "per_device": devices, "peak_bytes": devices[worst]["total"],
            "hbm_bytes": cl.hbm_bytes, "fits": devices[worst]["total"] <= cl.hbm_bytes}
