"""The serving view: weights and KV cache per GPU -> how many requests of a given context fit at once,
per GPU and per node (the MLA argument: V3 caches 70,272 B per token in BF16, a dense 405B GQA model
516,096 B). Weights are split evenly over the GPUs of one model replica (tensor/expert parallel);
the cache of each request lives on those GPUs in the same proportion."""

from __future__ import annotations

import math
from typing import Any

from nanoseek.cost import dtype_bytes, kv_cache_bytes_per_token, params
from nanoseek.errors import UserError, require
from nanoseek.plan.cluster import Cluster

SERVE_DTYPES = ("bf16", "fp8")


def replica_gpus(weight_bytes: float, cl: Cluster, reserve_gb: float) -> int:
    """The fewest GPUs whose memory holds the weights: 1, 2, 4, ... up to a node, then whole nodes."""
    usable = cl.hbm_bytes - reserve_gb * 1e9  # hbm_bytes: binary capacity (see Cluster.hbm_bytes)
    n = 1
    while weight_bytes / n >= usable:
        n = n * 2 if n < cl.gpus_per_node else n + cl.gpus_per_node
        if n > 64 * cl.gpus_per_node:
            raise UserError(f"the weights ({weight_bytes / 1e9:,.0f} GB) do not fit on 64 nodes of {cl.gpu}")
    return n


def plan_serving(model: Any, cl: Cluster, *, weight_dtype: str = "fp8", kv_dtype: str = "bf16",
                 context: int = 32768, gpus: int | None = None, reserve_gb: float = 3.0,
                 name: str | None = None) -> dict[str, Any]:
    require(weight_dtype in SERVE_DTYPES, "--weight-dtype", weight_dtype, "bf16 or fp8")
    require(kv_dtype in SERVE_DTYPES, "--kv-dtype", kv_dtype, "bf16 or fp8")
    require(isinstance(context, int) and context >= 1, "--context", context, "a positive integer")
    p = params(model)
    n_params = p["params_total"] + p["params_mtp_total"]
    weights = n_params * dtype_bytes(weight_dtype)
    n = replica_gpus(weights, cl, reserve_gb) if gpus is None else gpus
    require(isinstance(n, int) and n >= 1, "--serve-gpus", n, "a positive integer")
    kv_token = kv_cache_bytes_per_token(model, kv_dtype)
    per_request = kv_token * context
    free = cl.hbm_bytes - reserve_gb * 1e9 - weights / n
    per_gpu = max(0.0, free) / per_request  # caches spread over the replica's GPUs like the weights
    return {
        "model": name or str(model), "gpu": cl.gpu, "hbm_gb": cl.hbm_gb, "weight_dtype": weight_dtype,
        "kv_dtype": kv_dtype, "context": context, "params": n_params, "weight_bytes": weights,
        "replica_gpus": n, "weights_per_gpu": weights / n, "fits": free > 0,
        "kv_bytes_per_token": kv_token, "kv_bytes_per_request": per_request,
        "free_bytes_per_gpu": max(0.0, free),
        "requests_per_gpu": math.floor(per_gpu * 1000) / 1000,
        "requests_per_node": math.floor(per_gpu * cl.gpus_per_node),
        "requests_per_replica": math.floor(per_gpu * n),
        "assumptions": [
            f"weights ({n_params / 1e9:,.1f}B parameters{' incl. MTP' if p['params_mtp_total'] else ''}) in "
            f"{weight_dtype}, split evenly over "
            f"{n} GPU(s) of one replica ({'the fewest that hold them' if gpus is None else 'as asked'})",
            f"KV cache in {kv_dtype}: {kv_token:,.0f} B per token (main layers; MLA caches the latent and "
            "the RoPE key, GQA keys and values), spread over the replica's GPUs",
            f"HBM {cl.hbm_gb:g} GiB = {cl.hbm_bytes / 1e9:.1f} GB per GPU; reserve {reserve_gb:g} GB (CUDA context, "
            "activations of a decode step, fragmentation)",
            "requests per GPU = free memory / cache of one full-context request; fractional requests "
            "are shared across the replica",
        ],
    }
