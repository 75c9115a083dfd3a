"""Overlap in the MoE layer (nanoseek.parallel.overlap, `parallel.overlap=true`): the two-half schedule gives
the plain EP path's loss, gradients, balance loss and load counts, its async exchange round-trips exactly,
and the schedule really interleaves (one half's rows are in flight while the other half computes).

The multi-process part is one launch of 2 CPU processes with gloo (EP x2, one thread each, hard deadline);
this file is also that launch's worker: `python tests/test_moe_overlap.py OUT`.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.config import preset

# per-rank batch shapes: halves of 2 + 2 sequences, uneven 2 + 1, and one sequence split by token for the MoE
CASES = {"even": dict(batch=4, seq_aux=True), "uneven_batchwise_aux": dict(batch=3, seq_aux=False),
         "one_sequence": dict(batch=1, seq_aux=True)}


def model_config(seq_aux: bool):
    # tiny: layer 0 dense, layers 1-2 and the MTP block MoE (8 experts, top-2, one shared expert)
    return preset("tiny").replace(vocab_size=64, aux_loss_alpha=0.01, seq_aux=seq_aux)


# ---------------------------------------------------------------------------------------------- worker
def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def compare_step(ctx, batch: int, seq_aux: bool) -> dict:
    """One forward + backward of the same model on this rank's own rows: the plain EP path against the
    overlapped one (`parallel.overlap=true`) and against its no-overlap control (`wait_at_once`)."""
    import torch.distributed as dist

    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.parallel.overlap import OverlappedMoEBlock
    from nanoseek.parallel.parallelize import finish_gradients, parallelize

    torch.manual_seed(0)
    models = {"plain": DeepseekV3ForCausalLM(model_config(seq_aux))}
    models["overlap"], models["wait_at_once"] = copy.deepcopy(models["plain"]), copy.deepcopy(models["plain"])
    for name, model in models.items():
        ctx.cfg.overlap = name != "plain"
        parallelize(model, ctx)
    ctx.cfg.overlap = False
    hooks = [b.overlapped_forward for b in models["overlap"].modules()
             if isinstance(getattr(b, "overlapped_forward", None), OverlappedMoEBlock)]
    for b in models["wait_at_once"].modules():
        if getattr(b, "overlapped_forward", None) is not None:
            b.overlapped_forward.wait_at_once = True
    torch.manual_seed(1 + ctx.rank)
    ids = torch.randint(0, 64, (batch, 16))
    outs, norms = {}, {}
    for name, model in models.items():
        outs[name] = model(ids, labels=ids)
        outs[name].loss.backward()
        norms[name] = finish_gradients(model, ctx, 1e30)
    plain, p = models["plain"], outs["plain"]
    result = {"hooks": len(hooks), "balance_loss": float(p.balance_loss.detach())}
    for name in ("overlap", "wait_at_once"):
        o, params = outs[name], dict(models[name].named_parameters())
        grad_diff = max(float((full(q.grad) - full(params[n].grad)).abs().max()) for n, q in plain.named_parameters())
        loads = [(a.expert_load, b.expert_load) for a, b in zip(plain.moe_layers(), models[name].moe_layers())]
        diffs = torch.tensor([float((p.loss - o.loss).detach().abs()), float((p.balance_loss - o.balance_loss).detach().abs()),
                              grad_diff, abs(norms["plain"] - norms[name])], dtype=torch.float64)
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        result[name] = {"loss_diff": diffs[0].item(), "balance_diff": diffs[1].item(), "grad_diff": diffs[2].item(),
                        "norm_diff": diffs[3].item(), "loads_equal": all(torch.equal(a, b) for a, b in loads),
                        "loads_counted": all(bool(a.sum() > 0) for a, _ in loads)}
    return result


def round_trip(ctx) -> dict:
    """rows -> async dispatch -> async combine -> rows is exact, the received rows are the synchronous
    path's, and the backward of the pair sends every gradient back to its row (identity Jacobian)."""
    from nanoseek.model.moe import dispatch
    from nanoseek.parallel.expert_parallel import ExpertParallel
    from nanoseek.parallel.overlap import start_all_to_all, wait_all_to_all

    g = torch.Generator().manual_seed(10 + ctx.rank)
    n, k, e, d = 12, 2, 8, 4
    x = torch.randn(n, d, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    ep = ExpertParallel(ctx.ep_group, e)
    rows, plan = dispatch(x, idx, e)
    rows.requires_grad_(True)
    route = ep.route(plan.counts)
    received, ex = start_all_to_all(rows, route.got, route.sent, ep.group)
    received = wait_all_to_all(received, ex).index_select(0, route.order)
    synchronous = ep.send(rows.detach(), plan.counts)
    source_major = torch.empty_like(received).index_copy(0, route.order, received)
    back, ex = start_all_to_all(source_major, route.sent, route.got, ep.group)
    back = wait_all_to_all(back, ex)
    weight = torch.randn(back.shape, generator=g)
    (back * weight).sum().backward()
    return {"round_trip_exact": torch.equal(back.detach(), rows.detach()),
            "same_as_synchronous": torch.equal(received.detach(), synchronous.rows)
            and torch.equal(route.offsets, synchronous.offsets),
            "gradient_exact": torch.equal(rows.grad, weight)}


def schedule(ctx) -> dict:
    """The recorded forward and backward schedule of one overlapped MoE block."""
    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.parallel.overlap import OverlappedMoEBlock
    from nanoseek.parallel.parallelize import parallelize

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(model_config(True))
    ctx.cfg.overlap = True
    parallelize(model, ctx)
    ctx.cfg.overlap = False
    hook = model.model.layers[1].overlapped_forward
    assert isinstance(hook, OverlappedMoEBlock)
    hook.trace = []
    ids = torch.randint(0, 64, (4, 16))
    loss = model(ids, labels=ids).loss
    forward = list(hook.trace)
    loss.backward()
    return {"forward": forward, "backward": hook.trace[len(forward):]}


def worker(out: Path) -> None:
    import torch.distributed as dist

    from nanoseek.parallel.config import ParallelConfig
    from nanoseek.parallel.mesh import init_parallel

    torch.set_num_threads(1)
    ctx = init_parallel(ParallelConfig(ep=2), torch.device("cpu"))
    result = {case: compare_step(ctx, **kw) for case, kw in CASES.items()}
    result["round_trip"] = round_trip(ctx)
    result["schedule"] = schedule(ctx)
    if ctx.rank == 0:
        (out / "overlap.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import os

    worker(Path(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads may std::terminate while the interpreter tears the process group down


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from parallel_launch import launch

    out = tmp_path_factory.mktemp("overlap")
    for rc, log in launch(["tests/test_moe_overlap.py", str(out)], 2, timeout=120):
        assert rc == 0, log[-3000:]
    return json.loads((out / "overlap.json").read_text())


@pytest.mark.parametrize("variant", ["overlap", "wait_at_once"])
@pytest.mark.parametrize("case", CASES)
def test_overlap_gives_the_plain_ep_step(two_ranks, case, variant):
    assert two_ranks[case]["hooks"] == 3 and two_ranks[case]["balance_loss"] > 0  # layers 1, 2 and the MTP block
    r = two_ranks[case][variant]
    assert r["loss_diff"] <= 1e-6 and r["balance_diff"] <= 1e-6 and r["grad_diff"] <= 1e-6, r
    assert r["norm_diff"] <= 1e-6, r
    assert r["loads_equal"] and r["loads_counted"], r


def test_async_dispatch_combine_round_trip_is_exact(two_ranks):
    assert two_ranks["round_trip"] == {"round_trip_exact": True, "same_as_synchronous": True, "gradient_exact": True}


def test_one_half_is_in_flight_while_the_other_computes(two_ranks):
    forward = [tuple(e) for e in two_ranks["schedule"]["forward"]]
    assert forward == [
        ("compute", "attention A"), ("compute", "route A"), ("start", "dispatch A"),
        ("compute", "attention B"), ("compute", "route B"), ("start", "dispatch B"),
        ("wait", "dispatch A"), ("compute", "experts A"), ("start", "combine A"),
        ("wait", "dispatch B"), ("compute", "experts B"), ("start", "combine B"),
        ("compute", "shared A"), ("compute", "shared B"),
        ("wait", "combine A"), ("compute", "sum A"), ("wait", "combine B"), ("compute", "sum B")]
    # backward: every reverse exchange is started before the previous one is waited for, so two are in
    # flight at once and the other half's backward runs between a start and its wait
    backward = [tuple(e) for e in two_ranks["schedule"]["backward"]]
    assert sorted(backward) == sorted((ev, f"{x} {h}") for ev in ("grad start", "grad wait")
                                      for x in ("dispatch", "combine") for h in "AB")
    for name in ("dispatch A", "dispatch B", "combine A", "combine B"):
        start, wait = backward.index(("grad start", name)), backward.index(("grad wait", name))
        assert start < wait - 1, backward  # something else happened while it was in flight


def test_overlap_without_expert_parallelism_warns(capsys):
    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.parallel.overlap import install_overlap

    model = DeepseekV3ForCausalLM(model_config(True))
    assert install_overlap(model, 1) == 0
    assert "parallel.overlap has no effect without expert parallelism" in capsys.readouterr().err
    assert all(b.overlapped_forward is None for b in model.model.layers)
