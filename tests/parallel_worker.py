"""One rank of the multi-process checks in tests/test_parallel.py (started by tests/parallel_launch.py).

`python tests/parallel_worker.py OUT LAYOUT [LAYOUT ...]`, LAYOUT like `dp_shard=2,ep=1,nodes=1`: for each
layout, one training step on the mesh against one process on the same global batch; rank 0 writes the
largest differences to OUT/<layout>.json. A layout with `schedule=` (e.g. `pp=2,ep=2,schedule=zbv`) runs the
step through pipeline stages (tests/test_pipeline.py).
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
from nanoseek.parallel.parallelize import finish_gradients, parallelize, parallelize_pipeline
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


def pipeline_step(spec: str) -> dict:
    """One step through pipeline stages (5 blocks: uneven over 2 or 4 stages; the first dense; one MTP module;
    balance loss on) against one process on the same global batch: loss, every gradient, the norm, the bias."""
    kinds = {"schedule": str, "overlap": lambda v: v == "1"}
    cfg = ParallelConfig(**{k: kinds.get(k, int)(v) for k, v in (kv.split("=") for kv in spec.split(","))})
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(preset("tiny").replace(vocab_size=64, num_hidden_layers=5, n_routed_experts=8,
                                                         aux_loss_alpha=0.01))
    cfg.validate(model.config)
    ctx = init_parallel(cfg, torch.device("cpu"))
    reference = copy.deepcopy(model)
    pipe = parallelize_pipeline(model, ctx)
    torch.manual_seed(1)
    rows = 2 * cfg.n_microbatches  # per data-parallel rank: micro-batches of 2 rows
    batch = torch.randint(0, 64, (rows * ctx.dp_size, 16))
    ref = reference(batch, labels=batch, mtp_weight=0.3)
    ref.loss.backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e30))
    metrics = pipe.step(batch.chunk(ctx.dp_size)[ctx.dp_rank], 0.3)
    memory = pipe.memory_report()  # the step ran with the tracker on (the first step always does)
    norm = finish_gradients(model, ctx, 1e30, pipe)
    values = torch.tensor([metrics[k] for k in ("loss", "lm_loss", "mtp_loss", "balance_loss")], dtype=torch.float64)
    dist.all_reduce(values)
    values /= ctx.world_size  # the same on every pipeline rank: the mean over the data-parallel ranks
    expected = [float(getattr(ref, k)) for k in ("loss", "lm_loss", "mtp_loss", "balance_loss")]
    ref_params = dict(reference.named_parameters())
    diffs = {name: float((full(p.grad) - ref_params[name].grad).abs().max()) if p.grad is not None else float("inf")
             for name, p in model.named_parameters()}
    ref_bias = {n: m.gate.e_score_correction_bias for n, m in reference.named_modules() if hasattr(m, "update_bias")}
    for m in reference.moe_layers():
        m.update_bias(0.01)
    bias_equal = True
    for name, m in model.named_modules():
        if hasattr(m, "update_bias"):
            m.update_bias(0.01)
            bias_equal = bias_equal and torch.equal(m.gate.e_score_correction_bias, ref_bias[name])
    # every rank's gradient differences, and which parameters each holds
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, (diffs, bias_equal))
    held = set().union(*(p[0] for p in parts))
    pipe.refresh_mirror()
    mirror = pipe.last_chunk.mirror if pipe.last_chunk else None
    mirror_ok = mirror is None or torch.equal(mirror.detach(), full(model.model.embed_tokens.weight).detach()
                                              if pipe.first_chunk else mirror.detach())
    return {"loss_diff": max(abs(a - b) for a, b in zip(values.tolist(), expected)),
            "values": values.tolist(), "expected": expected,
            "grad_diff": max(v for p in parts for v in p[0].values()),
            "worst": max(((v, k) for p in parts for k, v in p[0].items()))[1],
            "no_grad": sorted(k for p in parts for k, v in p[0].items() if v == float("inf")),
            "params_covered": held == set(ref_params), "missing": sorted(set(ref_params) - held),
            "norm_diff": abs(norm - ref_norm), "bias_equal": all(p[1] for p in parts), "mirror_ok": mirror_ok,
            "stages": cfg.stages, "layers": {str(s): list(r) for s, r in pipe.layers.items()},
            "memory": memory}


def main() -> None:
    out = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        result = pipeline_step(spec) if "schedule=" in spec else one_step(spec)
        if dist.get_rank() == 0:
            (out / f"{spec}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()



# ---------------------------------------------------------------------------------------------- SFT and GRPO
# `python tests/parallel_worker.py OUT recipes MODEL_DIR`: one SFT step and one GRPO step per loss variant
# with data parallelism against one process on the same global batch / the same groups (tests/test_parallel_recipes.py).

def recipe_model():
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(preset("tiny").replace(vocab_size=320, num_hidden_layers=2, n_routed_experts=8,
                                                        aux_loss_alpha=0.01))


def grad_diff(model, reference) -> float:
    ref_grads = dict(reference.named_parameters())
    return max(float((full(p.grad) - ref_grads[name].grad).abs().max()) for name, p in model.named_parameters()
               if p.grad is not None)


def rank_mean(value: float, ctx) -> float:
    """What the trainer logs: the metric averaged over the data-parallel ranks."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / ctx.dp_size


def sft_step(ctx) -> dict:
    """Examples of uneven lengths and targets, packed; each rank its rows of the global batch."""
    from nanoseek.r1.sft import Example, SFTSource, pack_examples, packed_lm_loss

    g = torch.Generator().manual_seed(3)
    examples = []
    for i in range(12):
        n = int(torch.randint(6, 20, (1,), generator=g))
        k = int(torch.randint(1, n - 2, (1,), generator=g))  # the last k tokens are targets
        examples.append(Example(torch.randint(3, 320, (n,), generator=g).tolist(), [False] * (n - k) + [True] * k, i))
    seqs = pack_examples(examples, 32, no_target_prefix=2)  # tiny has one MTP module
    model = recipe_model()
    reference = copy.deepcopy(model)
    parallelize(model, ctx)
    whole = SFTSource(seqs, 4, seed=0, pad_id=0).next_batch()
    mine = SFTSource(seqs, 4, seed=0, pad_id=0, rank=ctx.dp_rank, ranks=ctx.dp_size).next_batch()
    ref_loss, _ = packed_lm_loss(reference, whole, mtp_weight=0.3)
    ref_loss.backward()
    loss, metrics = packed_lm_loss(model, mine, mtp_weight=0.3, ranks=ctx.dp_size)
    loss.backward()
    finish_gradients(model, ctx, 1e30)
    # what a mean of the ranks' own means would give (the targets fall unevenly: it must differ)
    with torch.no_grad():
        own, _ = packed_lm_loss(reference, {k: v for k, v in mine.items() if k not in ("target_tokens", "rows")},
                                mtp_weight=0.3)
    return {"loss_diff": abs(rank_mean(metrics["loss"], ctx) - float(ref_loss)), "grad_diff": grad_diff(model, reference),
            "mean_of_means_diff": abs(rank_mean(float(own), ctx) - float(ref_loss)),
            "targets": [int((mine["labels"][:, 1:] != -100).sum()), mine["target_tokens"]]}


def fixed_groups(task, tok, n_groups: int, group_size: int):
    """Scored groups with mixed rewards (every group informative) and completions of uneven lengths."""
    from nanoseek.r1.rollout import SampledTokens, score_completion

    groups = []
    for gi, problem in enumerate(task.train[:n_groups]):
        prompt = f"Q: {problem.meta['compact']}\n<think>"
        group = []
        for j in range(group_size):
            ok = (gi + j) % 2 == 0
            text = f"{'x' * (1 + 3 * gi + j)}</think><answer>{problem.answer}</answer>" if ok else "no " * (1 + gi * j)
            ids = tok.encode(text) + [tok.eos_id]
            group.append(score_completion(task, problem, prompt, text, SampledTokens(ids, [-1.0] * len(ids), "stop")))
        groups.append(group)
    return groups


def grpo_step(ctx, model_dir: str, variant: str) -> dict:
    """The same pre-made groups for one process (all of them) and for the ranks (each its share)."""
    from types import SimpleNamespace

    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.parallel.runtime import ParallelRuntime
    from nanoseek.r1.configs import GRPOConfig
    from nanoseek.r1.grpo_batches import RolloutSource
    from nanoseek.r1.grpo_objective import grpo_loss_fn
    from nanoseek.r1.grpo_ranks import DataParallelRanks, RolloutPolicy
    from nanoseek.r1.tasks import get_task

    tok = load_tokenizer(model_dir)
    task = get_task("arithmetic", n_train=8, n_test=2)
    cfg = GRPOConfig(model=model_dir, init_from=model_dir, loss=variant, group_size=2, prompts_per_step=4,
                     max_new_tokens=16, mu=2, grad_accum=2, beta=0.01, max_resample=0)
    groups = fixed_groups(task, tok, cfg.prompts_per_step, cfg.group_size)

    class Fixed(RolloutSource):
        def sample_groups(self, round_):
            self.next_problems()
            return groups[self.ranks.rank * self.prompts:(self.ranks.rank + 1) * self.prompts]

    def step(model, ref, ranks, policy):
        trainer = SimpleNamespace(model=model, device=torch.device("cpu"), tokens_per_step=0)
        source = Fixed(cfg, trainer, tok, task, ref, ranks=ranks, policy=policy)
        loss_fn, totals = grpo_loss_fn(cfg, ranks), {}
        for _ in range(cfg.grad_accum):  # as the trainer does: metrics averaged over the micro-batches
            micro_loss, metrics = loss_fn(model, source.next_batch())
            (micro_loss / cfg.grad_accum).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
        return totals

    model = recipe_model()
    reference, sampler, ref_model = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model).eval()
    expected = step(reference, ref_model, DataParallelRanks(), RolloutPolicy(reference))
    ref_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e30))
    parallelize(model, ctx)
    ranks = DataParallelRanks(ParallelRuntime(ctx))
    got = step(model, ref_model, ranks, RolloutPolicy(model, sampler))
    norm = finish_gradients(model, ctx, 1e30)
    logged = {k: rank_mean(got[k], ctx) for k in sorted(expected)}
    return {"loss_diff": abs(logged["loss"] - expected["loss"]), "grad_diff": grad_diff(model, reference),
            "grad_norm": ref_norm, "norm_diff": abs(norm - ref_norm),
            "metric_diffs": {k: abs(logged[k] - expected[k]) for k in expected}}


def recipes(out: Path, model_dir: str) -> None:
    import os

    ctx = init_parallel(ParallelConfig(dp_shard=int(os.environ["WORLD_SIZE"])), torch.device("cpu"))
    results = {"sft": sft_step(ctx)}
    for variant in ("grpo", "dr_grpo", "dapo", "gspo"):
        results[variant] = grpo_step(ctx, model_dir, variant)
    if dist.get_rank() == 0:
        (out / "recipes.json").write_text(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[2:3] == ["recipes"]:
        recipes(Path(sys.argv[1]), sys.argv[3])
        dist.barrier()
        dist.destroy_process_group()
    else:
        main()
