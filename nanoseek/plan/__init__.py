"""`nanoseek plan`: the memory, step time and cost of a training or serving job on a cluster, before
launching it, with every assumption printed. Built on the exact counts of `nanoseek.cost`.

One job per module: `cluster` (GPU table + overrides), `precision` (bytes per state and activation),
`blocks` (the model as parameters, FLOPs and kept activations per block), `layout` (the parallel
layout and its checks), `memory` (per-GPU memory), `time` (compute, all-to-all, bubble, data-parallel
sync), `host` (what a CPU pays in line: per-op overhead, unfused AdamW), `training` (one plan), `sweep`,
`serving`, `v3` (the DeepSeek-V3 run and what-ifs), `calibrate` (measure this machine, check against a
real training step), `validate` (four calibration runs), `report`, `cli`.
See docs/plan.md."""

from nanoseek.plan.cluster import Cluster, cluster
from nanoseek.plan.layout import SCHEDULES, Layout
from nanoseek.plan.serving import plan_serving
from nanoseek.plan.sweep import sweep
from nanoseek.plan.training import plan_training

__all__ = ["SCHEDULES", "Cluster", "Layout", "cluster", "plan_serving", "plan_training", "sweep"]
