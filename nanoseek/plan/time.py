"""Step time of a training layout: compute from the exact FLOPs at a stated GEMM efficiency, expert
dispatch/combine over NVLink and the network, the pipeline bubble from the schedule's formula, and
the data-parallel gradient exchange.

Per micro-batch on one pipeline chunk (F, B, W as in the DualPipe paper's table):
  F = forward FLOPs / rate (linear layers at the precision's GEMM peak; attention core, router and
      output head at the high-precision peak), each peak x the GEMM efficiency and x (SMs - comm SMs)/SMs;
  B = the full backward = 2 F (+ recomputation); W = the weight-gradient part of B = the matmul FLOPs
      of the forward (the attention core has no weights).
Expert all-to-all per MoE layer and token: K copies of the hidden state; the copies to other nodes
(at most min(K, M) nodes with node-limited routing, a fraction (N-1)/N of them remote) go over the
network, every copy crosses NVLink once within a node (all but 1/g of them, g = GPUs of the EP group
per node); dispatch at the precision's dispatch bytes, combine and both backward exchanges at its
combine bytes. Network and NVLink run concurrently (DeepSeek-V3 report §3.2.2): the slower one counts.
Memory-bound work (norms, activations, softmax, routing, copies) is not free: every activation the
forward produces (all the tensors `blocks` lists, before recomputation drops any) is counted as
written and read once in the forward and read, its gradient written and read, in the backward (2 and
3 passes) at the HBM bandwidth; the AdamW update reads and writes its state once per step.
On a CPU (`Cluster.host`), the framework's per-op cost and AdamW's unfused loop are added
(nanoseek/plan/host.py).
Bubbles: 1F1B (PP-1)(F+B); interleaved (PP-1)(F+B)/v; ZB1P (PP-1)(F+B-2W); ZB-V the ZB1P formula on
half-device chunks; DualPipe (PP/2-1)(F&B+B-3W); DualPipeV the same on half-device chunks over 2PP
chunks, i.e. (PP-1)(F&B+B-3W)/2 in device units. F&B, the overlapped forward-backward pair, is
max(F+B, its all-to-all time). Other schedules overlap a stated fraction of the all-to-all."""

from __future__ import annotations

from typing import Any

from nanoseek.plan.blocks import Block, act_bytes_per_token
from nanoseek.plan.memory import act_sizes
from nanoseek.plan.cluster import Cluster
from nanoseek.plan.layout import DUAL, Resolved
from nanoseek.plan.precision import Precision


def rates(cl: Cluster, p: Precision, gemm_efficiency: float) -> tuple[float, float]:
    """(low-precision GEMM FLOP/s, high-precision FLOP/s) one GPU achieves."""
    return cl.peak_flops(p.gemm_peak) * gemm_efficiency, cl.peak_flops(p.high_peak) * gemm_efficiency


def all_to_all_bytes(r: Resolved, d: int, k: int, p: Precision) -> dict[str, float]:
    """Bytes one GPU sends per token per MoE layer, network and NVLink, forward and backward."""
    n, g = r.ep_nodes, r.ep_gpus_per_node
    remote = min(k, r.node_limit) * (n - 1) / n if n > 1 else 0.0
    local = k * (g - 1) / g if g > 1 else 0.0
    if r.layout.ep == 1:
        remote = local = 0.0
    fwd_per_copy = d * (p.dispatch_bytes + p.combine_bytes)
    bwd_per_copy = d * 2 * p.combine_bytes
    return {"network_copies": remote, "nvlink_copies": local,
            "network_fwd": remote * fwd_per_copy, "nvlink_fwd": local * fwd_per_copy,
            "network_bwd": remote * bwd_per_copy, "nvlink_bwd": local * bwd_per_copy}


def compute_seconds(mine: list[Block], recompute: str, low: float, high: float) -> dict[str, float]:
    """Per token: forward F, its weight-gradient part W, and the recomputation the backward adds."""
    f = sum(b.gemm_flops / low + (b.high_mm_flops + b.core_flops) / high for b in mine)
    w = sum(b.gemm_flops / low + b.high_mm_flops / high for b in mine)
    extra = 0.0
    if recompute == "selective":
        extra = sum(b.recompute_flops for b in mine) / low
    elif recompute == "full":
        extra = sum(b.gemm_flops / low + (b.high_mm_flops + b.core_flops) / high for b in mine if b.layer)
    return {"F": f, "W": w, "recompute": extra}


def produced_bytes(mine: list[Block], p: Precision, profile: str, measured_units: bool = False) -> float:
    """Per token: every activation the forward produces (kept for the backward or not). With
    `measured_units` (a calibrated CPU, `Cluster.host`), the attention core, the routed experts and the
    output head + loss were timed as whole units, their elementwise passes included: their tensors (the
    math kernel's T x T probabilities, the experts' SwiGLU tensors, the logits and log-probabilities) are
    left out here."""
    sizes = act_sizes(p, profile)
    total = sum(act_bytes_per_token(b, "none", sizes) + act_bytes_per_token(b, "none", sizes, loss=True) for b in mine)
    if measured_units:
        total -= sum(a.elements * sizes[a.kind] for b in mine for a in b.acts if a.unit)
    return total


def chunk_times(bl: list[Block], blocks_in: tuple[int, ...], r: Resolved, cl: Cluster, p: Precision,
                gemm_efficiency: float, bw_efficiency: float) -> dict[str, float]:
    """F, B, W, the memory-bound part of F + B, and the all-to-all (forward, backward) of one
    micro-batch on one chunk, in seconds."""
    lo = r.layout
    tokens = lo.micro_batch * lo.seq_len
    mine = [bl[i] for i in blocks_in]
    c = compute_seconds(mine, lo.recompute, *rates(cl, p, gemm_efficiency))
    memory = produced_bytes(mine, p, lo.activations, cl.host is not None) / (cl.hbm_tb_s * 1e12 * bw_efficiency)
    f = (c["F"] + 2 * memory) * tokens
    b = (2 * c["F"] + c["recompute"] + 3 * memory) * tokens
    moe = sum(1 for blk in mine if blk.moe)
    a2a = all_to_all_bytes(r, mine[0].hidden, max(blk.top_k for blk in mine), p)
    net, nvl = cl.internode_gb_s * 1e9 * bw_efficiency, cl.nvlink_gb_s * 1e9 * bw_efficiency
    return {"F": f, "B": b, "W": c["W"] * tokens, "recompute": c["recompute"] * tokens,
            "memory_bound": 5 * memory * tokens,
            "comm_fwd": moe * tokens * max(a2a["network_fwd"] / net, a2a["nvlink_fwd"] / nvl),
            "comm_bwd": moe * tokens * max(a2a["network_bwd"] / net, a2a["nvlink_bwd"] / nvl)}


def device_times(chunks: list[dict[str, float]], dualpipe: bool) -> dict[str, float]:
    """A device's per-micro-batch times: the sum over its chunks (each micro-batch visits all of them),
    or, for DualPipe, their mean (half the micro-batches go each way, each through one of its stages)."""
    out = {k: sum(c[k] for c in chunks) for k in chunks[0]}
    if dualpipe:
        out = {k: v / len(chunks) for k, v in out.items()}
    return out


def bubble(schedule: str, pp: int, v: int, f: float, b: float, w: float, fb: float) -> float:
    """Idle time per step on the critical device (see the module docstring), never negative."""
    if pp == 1:
        return 0.0
    formula = {
        "1f1b": (pp - 1) * (f + b),
        "interleaved_1f1b": (pp - 1) * (f + b) / v,
        "zb1p": (pp - 1) * (f + b - 2 * w),
        "zbv": (pp - 1) * (f + b - 2 * w) / 2,
        "dualpipe": (pp / 2 - 1) * (fb + b - 3 * w),
        "dualpipev": (pp - 1) * (fb + b - 3 * w) / 2,
    }[schedule]
    return max(formula, 0.0)


def ring_seconds(nbytes: float, ranks: int, bandwidth: float) -> float:
    """A ring reduce-scatter or all-gather of `nbytes` over `ranks`: each GPU sends (ranks-1)/ranks of it."""
    return 0.0 if ranks <= 1 else nbytes * (ranks - 1) / ranks / bandwidth


def dp_seconds(bl: list[Block], r: Resolved, cl: Cluster, p: Precision, device: int,
               bw_efficiency: float) -> dict[str, float]:
    """Gradient exchange per step: ZeRO 1/2 reduce-scatter the gradients and all-gather the updated
    weights once per step (ZeRO 0 all-reduces: the same bytes twice); ZeRO 3 (FSDP) also all-gathers
    the weights for each micro-batch's forward and backward (prefetched: hidden behind compute up to
    the compute time). A group within one node uses NVLink, one spanning nodes the network."""
    lo = r.layout
    mine = [bl[i] for c in r.device_chunks[device] for i in r.chunk_blocks[c]]
    dense = sum(b.dense_params for b in mine)
    expert = sum(b.expert_params for b in mine) / lo.ep
    net, nvl = cl.internode_gb_s * 1e9 * bw_efficiency, cl.nvlink_gb_s * 1e9 * bw_efficiency
    dense_bw = nvl if r.dp <= cl.gpus_per_node else net
    expert_bw = nvl if r.dp <= cl.gpus_per_node else net  # expert replicas sit ep ranks apart
    step = 0.0
    per_micro = 0.0
    for params, ranks, bw in ((dense, r.dp, dense_bw), (expert, r.dp_shard, expert_bw)):
        step += ring_seconds(params * p.grad_bytes, ranks, bw) + ring_seconds(params * p.weight_bytes, ranks, bw)
        if lo.zero >= 3:
            per_micro += 2 * ring_seconds(params * p.weight_bytes, ranks, bw)
    return {"step": step, "per_micro": per_micro}


def optimizer_seconds(bl: list[Block], r: Resolved, cl: Cluster, p: Precision, device: int,
                      bw_efficiency: float) -> float:
    """AdamW over this device's shard of the state: read master (or weights), gradient and both moments,
    write master, both moments and (with a separate master) the working weights."""
    lo = r.layout
    mine = [bl[i] for c in r.device_chunks[device] for i in r.chunk_blocks[c]]
    dense = sum(b.dense_params for b in mine)
    expert = sum(b.expert_params for b in mine) / lo.ep
    updated = (dense / r.dp + expert / r.dp_shard) if lo.zero >= 1 else dense + expert
    master = p.master_bytes or p.weight_bytes
    per_param = 2 * master + p.grad_bytes + 4 * p.moment_bytes + (p.weight_bytes if p.master_bytes else 0)
    return updated * per_param / (cl.hbm_tb_s * 1e12 * bw_efficiency)


def step_time(bl: list[Block], r: Resolved, cl: Cluster, p: Precision, *, gemm_efficiency: float,
              bw_efficiency: float, overlap: float, host: dict[str, float] | None = None) -> dict[str, Any]:
    """Seconds per optimizer step on the slowest device, with its parts. `host`: the host-side costs
    of a CPU (`nanoseek.plan.host.host_seconds`): its framework time is added, its optimizer time
    replaces the fused-kernel estimate."""
    lo = r.layout
    dual = lo.schedule in DUAL
    chunk = [chunk_times(bl, blocks_in, r, cl, p, gemm_efficiency, bw_efficiency) for blocks_in in r.chunk_blocks]
    devices = [device_times([chunk[c] for c in cs], lo.schedule == "dualpipe") for cs in r.device_chunks]
    per_mb = []
    for d, t in enumerate(devices):
        comm = t["comm_fwd"] + t["comm_bwd"]
        if dual:
            fb = max(t["F"] + t["B"], comm)
            exposed = fb - t["F"] - t["B"]
        else:
            exposed = (1 - overlap) * comm
            fb = t["F"] + t["B"] + exposed
        per_mb.append({"fb": fb, "exposed_comm": exposed, "hidden_comm": comm - exposed, **t})
    worst = max(range(len(per_mb)), key=lambda d: per_mb[d]["fb"])
    t = per_mb[worst]
    share = 0.0 if dual else 1 - overlap
    f_eff = t["F"] + share * t["comm_fwd"]
    b_eff = t["B"] + share * t["comm_bwd"]
    bub = bubble(lo.schedule, lo.pp, lo.virtual_stages, f_eff, b_eff, t["W"], t["fb"])
    dp = dp_seconds(bl, r, cl, p, worst, bw_efficiency)
    fsdp_exposed = max(0.0, dp["per_micro"] - (t["F"] + t["B"])) * r.n_micro
    compute = r.n_micro * (t["F"] + t["B"])
    opt = optimizer_seconds(bl, r, cl, p, worst, bw_efficiency) if host is None else host["optimizer_s"]
    framework = 0.0 if host is None else host["framework_s"]
    total = r.n_micro * t["fb"] + bub + dp["step"] + fsdp_exposed + opt + framework
    tokens = lo.micro_batch * lo.seq_len
    d, k = bl[0].hidden, max((b.top_k for b in bl), default=0)
    return {"step_s": total, "compute_s": compute, "recompute_s": r.n_micro * t["recompute"],
            "memory_bound_s": r.n_micro * t["memory_bound"], "optimizer_s": opt, "framework_s": framework,
            "framework_ops": 0 if host is None else host["ops"],
            "exposed_all_to_all_s": r.n_micro * t["exposed_comm"], "hidden_all_to_all_s": r.n_micro * t["hidden_comm"],
            "bubble_s": bub, "dp_sync_s": dp["step"], "fsdp_exposed_s": fsdp_exposed,
            "critical_device": worst,
            "micro_batch": {k2: t[k2] for k2 in ("F", "B", "W", "memory_bound", "comm_fwd", "comm_bwd", "fb")},
            "pp_p2p_s_per_micro_batch": (tokens * d * p.act_bytes / (cl.internode_gb_s * 1e9 * bw_efficiency)
                                         if lo.pp > 1 else 0.0),
            "all_to_all_per_token_per_moe_layer": all_to_all_bytes(r, d, k, p)}
