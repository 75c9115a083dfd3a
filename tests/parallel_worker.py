"""One rank of the multi-process checks in tests/test_parallel.py (started by tests/parallel_launch.py).

`python tests/parallel_worker.py OUT LAYOUT [LAYOUT ...]`, LAYOUT like `dp_shard=2,ep=1,nodes=1`: for each
layout, one training step on the mesh against one process on the same global batch; rank 0 writes the
largest differences to OUT/<layout>.json.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nanoseek.config import preset
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.model.moe import combine, dispatch
from nanoseek.parallel.config import ParallelConfig
from nanoseek.parallel.expert_parallel import ExpertParallel
from nanoseek.parallel.mesh import init_parallel
from nanoseek.parallel.parallelize import finish_gradients, parallelize
from nanoseek.parallel.traffic import TrafficMeter

torch.set_num_threads(1)


def tiny_model():
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(preset("tiny").replace(vocab_size=64, num_hidden_layers=2, n_routed_experts=8))


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def round_trip(ctx) -> dict:
    """Dispatch -> send -> send back -> combine is exact, and each rank receives exactly the rows of its
    experts, from every rank, in token order."""
    g = torch.Generator().manual_seed(10 + ctx.rank)
    n, k, e, d = 12, 2, 8, 4
    x = torch.randn(n, d, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=g)
    ep = ExpertParallel(ctx.ep_group, e)
    rows, plan = dispatch(x, idx, e)
    batch = ep.send(rows, plan.counts)
    back = ep.send_back(batch.rows, batch)
    xs, idxs = [torch.empty_like(x) for _ in range(ep.ep)], [torch.empty_like(idx) for _ in range(ep.ep)]
    dist.all_gather(xs, x, group=ctx.ep_group)
    dist.all_gather(idxs, idx, group=ctx.ep_group)
    expected = torch.cat([xs[s][(idxs[s] == ex).any(1)] for ex in range(ep.me * ep.n_local, (ep.me + 1) * ep.n_local)
                          for s in range(ep.ep)])
    return {"round_trip_exact": torch.equal(back, rows) and torch.equal(combine(back, plan, weights),
                                                                        combine(rows, plan, weights)),
            "received_exact": torch.equal(batch.rows, expected)}


def one_step(spec: str) -> dict:
    cfg = ParallelConfig(**{k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))})
    model = tiny_model()
    cfg.validate(model.config)
    ctx = init_parallel(cfg, torch.device("cpu"))
    reference = copy.deepcopy(model)
    meter = TrafficMeter()
    parallelize(model, ctx, meter)
    torch.manual_seed(1)
    batch = torch.randint(0, 64, (2 * ctx.dp_size, 16))
    # one process, whole batch
    ref = reference(batch, labels=batch)
    ref.loss.backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e30))
    # this rank's part
    mine = batch.chunk(ctx.dp_size)[ctx.dp_rank]
    out = model(mine, labels=mine)
    out.loss.backward()
    norm = finish_gradients(model, ctx, 1e30)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    loss /= ctx.world_size
    ref_grads = dict(reference.named_parameters())
    grad_diff = max(float((full(p.grad) - ref_grads[name].grad).abs().max()) for name, p in model.named_parameters())
    # aux-free bias: loads reduced over all ranks -> every rank the same bias, equal to one process's
    # (the reference's loads get all-reduced too: every rank holds the same, and only their signs count)
    ref_bias = [m.update_bias(0.01) is not None and m.gate.e_score_correction_bias for m in reference.moe_layers()]
    biases = [m.update_bias(0.01) is not None and m.gate.e_score_correction_bias for m in model.moe_layers()]
    gathered = [[torch.empty_like(b) for _ in range(ctx.world_size)] for b in biases]
    for b, out_list in zip(biases, gathered):
        dist.all_gather(out_list, b)
    ref_loss = float(ref.loss.detach())
    result = {"loss": float(loss), "ref_loss": ref_loss, "loss_diff": abs(float(loss) - ref_loss),
              "grad_diff": grad_diff, "norm_diff": abs(norm - ref_norm),
              "bias_same_on_all_ranks": all(torch.equal(o, lst[0]) for lst in gathered for o in lst),
              "bias_equals_one_process": all(torch.equal(b, r) for b, r in zip(biases, ref_bias)),
              "bias_moved": any(bool(b.abs().sum() > 0) for b in biases)}
    traffic = meter.take()
    result["traffic"] = traffic
    if cfg.ep > 1:
        result.update(round_trip(ctx))
    return result


def main() -> None:
    out = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        result = one_step(spec)
        if dist.get_rank() == 0:
            (out / f"{spec}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
