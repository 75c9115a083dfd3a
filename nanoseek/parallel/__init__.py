"""Training on several processes with torch.distributed (launched by torchrun; docs/distributed.md).

  config.py           ParallelConfig: the layout (pp + schedule, dp_shard, ep, nodes), checked before any process group
  mesh.py             the process group (gloo on CPU, nccl on CUDA) and the (pp, dp_shard, ep) DeviceMesh
  expert_parallel.py  routed experts sharded over EP; dispatch/combine with all_to_all_single
  overlap.py          the MoE block in two halves: one half's dispatch/combine in flight while the other computes
  fsdp.py             FSDP2 per block and root, mixed precision, the global gradient norm
  pipeline.py         pipeline stages (torch.distributed.pipelining): 1f1b, interleaved_1f1b, zbv, dualpipev
  pipeline_trace.py   what a pipeline step did: timed compute actions, micro-batches and activations held
  parallelize.py      all applied to a model; gradient completion and clipping after backward
  traffic.py          all-to-all bytes per rank, within and across (simulated) nodes
  dcp.py              torch.distributed.checkpoint save/load (atomic, reshardable) and HF export
  runtime.py          ParallelRuntime: what the trainer calls (layout, gradients, metrics, checkpoints)

Sits below nanoseek.train (which drives it) and above nanoseek.model (which it shards).
"""

from nanoseek.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
