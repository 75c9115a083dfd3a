"""`plan_training`: memory, step time, MFU, tokens per day, GPU-hours and dollars of one training
layout on one cluster, with every assumption it rests on (printed with the result, in --json too)."""

from __future__ import annotations

from typing import Any

from nanoseek.cost import params, train_flops_per_token
from nanoseek.errors import is_finite_number, require
from nanoseek.plan.blocks import ATTENTION_KERNELS, blocks
from nanoseek.plan.cluster import Cluster
from nanoseek.plan.host import host_seconds
from nanoseek.plan.layout import DUAL, Layout, resolve
from nanoseek.plan.memory import DP_BUCKET_BYTES, memory
from nanoseek.plan.precision import precision
from nanoseek.plan.time import step_time

# Stated, not fitted: see docs/plan.md for why these values.
GEMM_EFFICIENCY = 0.5   # achieved / dense peak for every matmul-like op (GEMMs and the attention core)
BW_EFFICIENCY = 0.8     # achieved / spec-sheet link bandwidth (NCCL-style collectives)
RESERVE_GB = 3.0        # CUDA context, NCCL buffers and allocator fragmentation per GPU


def check_efficiencies(gemm_efficiency: float, bw_efficiency: float, overlap: float, reserve_gb: float) -> None:
    require(is_finite_number(gemm_efficiency) and 0 < gemm_efficiency <= 1, "--gemm-efficiency",
            gemm_efficiency, "in (0, 1]")
    require(is_finite_number(bw_efficiency) and 0 < bw_efficiency <= 1, "--bw-efficiency", bw_efficiency,
            "in (0, 1]")
    require(is_finite_number(overlap) and 0 <= overlap <= 1, "--overlap", overlap, "in [0, 1]")
    require(is_finite_number(reserve_gb) and reserve_gb >= 0, "--reserve-gb", reserve_gb, "a number >= 0")


def plan_training(model: Any, cl: Cluster, layout: Layout, *, tokens: float | None = None,
                  gemm_efficiency: float = GEMM_EFFICIENCY, bw_efficiency: float = BW_EFFICIENCY,
                  overlap: float = 0.0, reserve_gb: float = RESERVE_GB, name: str | None = None) -> dict[str, Any]:
    """The plan of one layout (a JSON-ready dict). `tokens`: a training budget for GPU-hours and $."""
    check_efficiencies(gemm_efficiency, bw_efficiency, overlap, reserve_gb)
    require(layout.attention in ATTENTION_KERNELS, "--attention", layout.attention,
            "one of " + ", ".join(ATTENTION_KERNELS))
    bl = blocks(model, layout.seq_len, include_mtp=layout.mtp, attention_kernel=layout.attention)
    r = resolve(layout, model, cl, bl)
    p = precision(layout.precision)
    mem = memory(bl, r, p, cl, reserve_gb)
    has_mtp = layout.mtp and params(model)["mtp_modules"] > 0
    host = None
    if cl.host is not None:
        host = host_seconds(model, cl.host, r.n_micro, mem["per_device"][0]["params_on_device"],
                            cl.hbm_tb_s * 1e12 * bw_efficiency, include_mtp=has_mtp)
    t = step_time(bl, r, cl, p, gemm_efficiency=gemm_efficiency, bw_efficiency=bw_efficiency, overlap=overlap,
                  host=host)
    model_flops = train_flops_per_token(model, layout.seq_len, include_mtp=has_mtp)
    tokens_per_step = r.global_batch * layout.seq_len
    tokens_per_s = tokens_per_step / t["step_s"]
    peak_bf16 = cl.peak_tflops["bf16"] * 1e12 if "bf16" in cl.peak_tflops else None
    peak_own = cl.peak_tflops[p.gemm_peak] * 1e12
    result: dict[str, Any] = {
        "model": name or str(model) if not isinstance(model, dict) else name or "model",
        "cluster": cl.to_dict(), "layout": layout.to_dict(), "precision": p.to_dict(),
        "derived": {"dp": r.dp, "dp_shard": r.dp_shard, "n_micro": r.n_micro,
                    "global_batch": r.global_batch, "tokens_per_step": tokens_per_step, "chunks": r.n_chunks,
                    "layers_per_device": [sum(bl[i].layer for c in cs for i in r.chunk_blocks[c])
                                          for cs in r.device_chunks],
                    "ep_nodes": r.ep_nodes, "node_limit": r.node_limit},
        "memory": mem, "time": t,
        "throughput": {
            "tokens_per_s": tokens_per_s, "tokens_per_day": tokens_per_s * 86400,
            "model_flops_per_token": model_flops,
            "mfu_bf16_peak": tokens_per_s * model_flops / (cl.n_gpus * peak_bf16) if peak_bf16 else None,
            "mfu_precision_peak": tokens_per_s * model_flops / (cl.n_gpus * peak_own), "precision_peak": p.gemm_peak,
        },
        "assumptions": assumptions(layout, cl, p, gemm_efficiency, bw_efficiency, overlap, reserve_gb, has_mtp),
    }
    if tokens is not None:
        hours = tokens / tokens_per_s * cl.n_gpus / 3600
        result["budget"] = {"tokens": tokens, "gpu_hours": hours, "days": tokens / tokens_per_s / 86400,
                            "usd": None if cl.usd_per_gpu_hour is None else hours * cl.usd_per_gpu_hour,
                            "usd_per_gpu_hour": cl.usd_per_gpu_hour}
    return result


def assumptions(lo: Layout, cl: Cluster, p, gemm_eff: float, bw_eff: float, overlap: float,
                reserve_gb: float, has_mtp: bool) -> list[str]:
    dual = lo.schedule in DUAL
    return [
        f"compute: exact FLOPs (nanoseek.cost) at {gemm_eff:.0%} of the dense peak ({p.gemm_peak} for linear "
        f"layers, {p.high_peak} for attention core, router and output head), peaks x ({cl.sms}-{cl.comm_sms})/"
        f"{cl.sms} SMs; backward = 2 x forward, weight-gradient part W = the forward matmul FLOPs",
        f"memory-bound work: every activation produced moves 2x in the forward and 3x in the backward, the "
        f"AdamW update reads and writes its state once, at {bw_eff:.0%} of {cl.hbm_tb_s:g} TB/s",
        f"precision {p.name}: {p.source}",
        f"state per parameter: weights {p.weight_bytes:g} B, master {p.master_bytes:g} B, gradients "
        f"{p.grad_bytes:g} B, 2 AdamW moments x {p.moment_bytes:g} B; ZeRO-{lo.zero} shards "
        + ("nothing" if lo.zero == 0 else "optimizer states" if lo.zero == 1 else
           "optimizer states + gradients" if lo.zero == 2 else "optimizer states + gradients + weights")
        + " over the dp = dp_shard x ep data-parallel ranks (experts over their dp_shard replicas)",
        f"activations: the tensors nanoseek's implementation keeps for the backward (see nanoseek/plan/blocks.py), "
        f"{p.act_bytes:g} B each, linear-layer inputs {p.linear_in_bytes:g} B, router/loss fp32; recompute="
        f"{lo.recompute}; " + ("fused attention (no T x T matrix)" if lo.attention == "fused" else
                               "math attention (keeps the T x T probabilities, as torch's CPU SDPA does)")
        + f"; profile {lo.activations}"
        + (" (MoE SwiGLU inputs cached at linear-input bytes per the V3 report §3.3.4; ASSUMED: routed "
           "experts' outputs not kept, the routing-weight gradient formed on the expert side)"
           if lo.activations == "v3" else " (what nanoseek's own implementation keeps)"),
        f"activations in flight per device per the {lo.schedule} schedule (nanoseek/plan/memory.py); the loss's "
        "logits held for one micro-batch",
        f"expert all-to-all: top-k copies of the hidden state, dispatch {p.dispatch_bytes:g} B, combine and "
        f"backward {p.combine_bytes:g} B per element; network and NVLink concurrent at {bw_eff:.0%} of the "
        "table's per-direction bandwidth",
        ("overlap: DualPipe-style pairs hide the all-to-all behind the other micro-batch's compute (F&B = "
         "max(F+B, all-to-all))" if dual else f"overlap: {overlap:.0%} of the all-to-all hidden behind compute"),
        "data parallel: gradients reduce-scattered and weights all-gathered once per step, not overlapped"
        + ("; FSDP gathers per micro-batch hidden up to the compute time" if lo.zero >= 3 else ""),
        "pipeline send/recv assumed hidden behind compute (its time per micro-batch is reported)",
        f"HBM {cl.hbm_gb:g} GB of the datasheet = {cl.hbm_gb:g} GiB = {cl.hbm_bytes / 1e9:.1f}e9 bytes "
        "(memory sizes here are decimal GB)",
        f"buffers: EP dispatch/combine for one micro-batch (x2 with DualPipe overlap), PP send/recv, "
        f"{DP_BUCKET_BYTES / 1e6:.0f} MB DP buckets; reserve {reserve_gb:g} GB per GPU",
        "MTP modules " + ("trained (on the last pipeline chunk, in FLOPs and MFU)" if has_mtp else "not trained"),
        "MFU = model FLOPs (3 x forward, recomputation excluded) / peak of all GPUs (full SMs)",
        "not modelled: " + ("" if cl.host else "kernel launch and framework overhead (hidden behind a GPU's "
                            "kernel queue), ") + "FP8 quantisation kernels, load imbalance across experts, failures "
        "and restarts",
    ] + ([f"host (CPU): every dispatched op costs {cl.host.op_s * 1e6:.2f} us ({cl.host.source}); ops counted "
          "per block of nanoseek's implementation; AdamW as torch's unfused single-tensor loop + gradient clipping "
          "(nanoseek/plan/host.py)"] if cl.host else [])
