"""The DeepSeek-V3 pre-training run as a plan, and the what-ifs the seeds argue about.

Published setup (DeepSeek-V3 technical report §3.1-3.3, §4.2): 2,048 H800 GPUs (8 per node, NVLink
within, 400 Gb/s InfiniBand across); 16-way pipeline parallelism with DualPipe; 64-way expert
parallelism over 8 nodes; ZeRO-1 data parallelism; FP8 mixed precision; 20 of 132 SMs kept for
communication; recomputation of RMSNorm and the MLA up-projections; sequence length 4,096; batch
size 15,360 sequences (after its ramp-up); node-limited routing to at most 4 nodes; one MTP module;
14.8T tokens; 2.664M H800 GPU-hours for pre-training. Not stated by the report, so our choices: a
micro-batch of 1 sequence, the layers split over the 16 stages to balance forward time (the first
and last stages, which hold the embedding, the output head and the MTP module, get fewer layers),
and the "v3" activation profile (plan/blocks.py). Only the setup goes in; the 2.664M is compared
with, never used."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from nanoseek.plan.cluster import cluster
from nanoseek.plan.layout import Layout
from nanoseek.plan.training import plan_training

PUBLISHED_GPU_HOURS = 2.664e6
TOKENS = 14.8e12
V3_LAYOUT = Layout(pp=16, ep=64, zero=1, schedule="dualpipe", micro_batch=1, global_batch=15360, seq_len=4096,
                   precision="fp8", recompute="selective", activations="v3")
WHAT_IFS = {
    "published setup (FP8, DualPipe, node limit 4)": {},
    "layers split evenly instead of by time": {"split": "even"},
    "BF16 instead of FP8": {"precision": "bf16"},
    "1F1B instead of DualPipe": {"schedule": "1f1b"},
    "no node limit (a token may reach 8 nodes)": {"node_limit": 0},
    "1F1B and no node limit": {"schedule": "1f1b", "node_limit": 0},
    "nanoseek's activation profile": {"activations": "nanoseek"},
}


def v3_plans(**plan_kwargs: Any) -> list[dict[str, Any]]:
    """One plan per what-if (the first is the published setup)."""
    cl = cluster("H800", 2048, comm_sms=20)
    out = []
    for label, change in WHAT_IFS.items():
        r = plan_training("deepseek-v3", cl, replace(V3_LAYOUT, **change), tokens=TOKENS, name=label, **plan_kwargs)
        r["vs_published_gpu_hours"] = r["budget"]["gpu_hours"] / PUBLISHED_GPU_HOURS - 1
        out.append(r)
    return out


def v3_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the what-ifs."""
    lines = ["| scenario | peak memory (GPU) | fits 80 GiB (85.9 GB) | all-to-all / compute per micro-batch | step "
             "| bubble | exposed all-to-all | MFU (bf16 peak) | GPU-hours, 14.8T | vs 2.664M |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, m = r["time"], r["memory"]
        mb = t["micro_batch"]
        ratio = (mb["comm_fwd"] + mb["comm_bwd"]) / (mb["F"] + mb["B"])
        lines.append(f"| {r['model']} | {m['peak_bytes'] / 1e9:.1f} GB (dev {m['worst_device']}) | "
                     f"{'yes' if m['fits'] else 'no'} | {ratio:.2f} | {t['step_s']:.2f} s | {t['bubble_s']:.2f} s | "
                     f"{t['exposed_all_to_all_s']:.2f} s | {r['throughput']['mfu_bf16_peak']:.1%} | "
                     f"{r['budget']['gpu_hours'] / 1e6:.3f}M | {r['vs_published_gpu_hours']:+.1%} |")
    return "\n".join(lines)
