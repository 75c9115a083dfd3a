"""`--sweep`: every layout of a cluster (pp, ep, ZeRO stage, schedule, recomputation) at a fixed global
batch, kept when it is valid and fits in memory, sorted by step time."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from nanoseek.cost import arch
from nanoseek.cost.models import as_dict
from nanoseek.errors import UserError
from nanoseek.plan.blocks import RECOMPUTE
from nanoseek.plan.cluster import Cluster
from nanoseek.plan.layout import SCHEDULES, Layout
from nanoseek.plan.training import plan_training


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(model: Any, cl: Cluster, base: Layout, schedules: tuple[str, ...] = SCHEDULES,
               zeros: tuple[int, ...] = (1, 3), recomputes: tuple[str, ...] = RECOMPUTE) -> list[Layout]:
    c = dict(as_dict(model))
    layers = len(arch(c).layers)
    experts = c.get("n_routed_experts") or 0
    out = []
    for pp in divisors(cl.n_gpus):
        if pp > layers:
            continue
        dp = cl.n_gpus // pp
        eps = [e for e in divisors(dp) if experts and experts % e == 0] if experts else [1]
        for ep in eps:
            for schedule in (schedules if pp > 1 else ("1f1b",)):
                for zero in zeros:
                    for recompute in recomputes:
                        out.append(replace(base, pp=pp, ep=ep, schedule=schedule, zero=zero, recompute=recompute,
                                           dp_shard=None))
    return out


def sweep(model: Any, cl: Cluster, base: Layout, *, top: int = 20, schedules: tuple[str, ...] = SCHEDULES,
          zeros: tuple[int, ...] = (1, 3), recomputes: tuple[str, ...] = RECOMPUTE,
          **plan_kwargs: Any) -> dict[str, Any]:
    """Feasible layouts by step time (fastest first), and how many were tried and refused. The sweep
    varies pp, ep, the schedule, the ZeRO stage and recomputation; everything else comes from `base`."""
    rows, invalid, too_big = [], 0, 0
    for layout in candidates(model, cl, base, schedules, zeros, recomputes):
        try:
            result = plan_training(model, cl, layout, **plan_kwargs)
        except UserError:
            invalid += 1
            continue
        if not result["memory"]["fits"]:
            too_big += 1
            continue
        rows.append(result)
    rows.sort(key=lambda r: r["time"]["step_s"])
    return {"tried": invalid + too_big + len(rows), "invalid": invalid, "do_not_fit": too_big,
            "feasible": len(rows), "top": rows[:top]}
