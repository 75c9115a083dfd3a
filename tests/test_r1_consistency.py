"""Training-inference consistency of GRPO (nanoseek.r1.consistency): the rollout's MoE routing is mapped
back to (row, position) exactly, log-prob gaps and routing mismatches are ~0 for a model compared with
itself and clearly not when the rollout weights are perturbed, routing replay forces the rollout's
experts, and a GRPO run logs all of it."""

import copy

import pytest
import torch

from nanoseek.config import preset
from nanoseek.inference import SamplingParams, generate
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.r1.consistency import RouteCheck, batch_routes, engine_routes, logp_gap, moe_routers, recording_routes
from nanoseek.r1.grpo_loss import sequence_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPERATURE = 1.0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DeepseekV3ForCausalLM(preset("tiny", vocab_size=64, max_position_embeddings=64)).eval()
    assert len(moe_routers(m)) >= 2
    return m


def rollout(model, prompts, seed=0):
    """Sample with many stop tokens, so completion lengths differ and the engine drops finished rows."""
    params = SamplingParams(max_new_tokens=10, temperature=TEMPERATURE, seed=seed,
                            stop_token_ids=tuple(range(0, 64, 5)))
    with recording_routes(model) as calls:
        rows = generate(model, prompts, params)
    lengths = [len(r.token_ids) for r in rows]
    assert len(set(lengths)) > 2, lengths  # the compaction path is exercised
    return rows, engine_routes(calls, [len(p) for p in prompts], lengths)


def training_batch(prompts, rows):
    width = max(len(p) + len(r.token_ids) for p, r in zip(prompts, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    engine = torch.zeros(len(rows), width)
    sampled = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        n = len(p) + len(r.token_ids)
        ids[i, :n] = torch.tensor(p + r.token_ids)
        attn[i, :n] = 1
        engine[i, len(p):n] = torch.tensor(r.logprobs)
        sampled[i, len(p):n] = True
    return ids, attn, engine, sampled


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15], [3, 3, 3, 3, 3], [7, 8, 9, 10],
           [20, 21, 22], [30, 31, 32, 33, 34, 35, 36]]


def measure(model, prompts, rows, routes, replay=False):
    ids, attn, engine, sampled = training_batch(prompts, rows)
    packed = batch_routes([(len(p), r) for p, r in zip(prompts, routes)], ids.shape[1])
    check = RouteCheck(packed, replay=replay)
    with torch.no_grad(), check.on(model):
        logits = model(ids, attention_mask=attn).logits
    total, top, n = logp_gap(sequence_logprobs(logits, ids, TEMPERATURE)[0], engine, sampled)
    return check, total / n, top, logits


def test_engine_routing_maps_back_to_the_training_positions(model):
    rows, routes = rollout(model, PROMPTS)
    n_layers = len(moe_routers(model))
    for p, r, rt in zip(PROMPTS, rows, routes):
        assert rt.shape == (n_layers, len(p) + len(r.token_ids) - 1, model.config.num_experts_per_tok)
    check, gap_mean, gap_max, _ = measure(model, PROMPTS, rows, routes)
    assert check.compared == sum(rt.shape[0] * rt.shape[1] for rt in routes)
    # the same weights: only float-order noise between cached decode and the full forward
    assert check.share < 0.01, check.share
    assert gap_max < 1e-3 and gap_mean < 1e-4, (gap_mean, gap_max)


def test_perturbed_rollout_weights_are_detected(model):
    torch.manual_seed(1)
    stale = copy.deepcopy(model)
    with torch.no_grad():
        for p in stale.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows, routes = rollout(stale, PROMPTS)
    check, gap_mean, gap_max, _ = measure(model, PROMPTS, rows, routes)
    assert check.share > 0.05, check.share
    assert gap_mean > 1e-3 and gap_max > 1e-2, (gap_mean, gap_max)


def test_routing_replay_uses_the_rollout_experts(model):
    torch.manual_seed(2)
    stale = copy.deepcopy(model)
    with torch.no_grad():
        for p in stale.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows, routes = rollout(stale, PROMPTS)
    ids, attn, _, _ = training_batch(PROMPTS, rows)
    packed = batch_routes([(len(p), r) for p, r in zip(PROMPTS, routes)], ids.shape[1])
    check = RouteCheck(packed, replay=True)
    used = []
    with check.on(model):
        for router in moe_routers(model):  # see what the router goes on with after the hook
            router.route_hook = (lambda idx, inner=router.route_hook: used.append(inner(idx)) or used[-1])
        model.train()
        logits = model(ids, attention_mask=attn).logits
        model.eval()
    assert all(r.route_hook is None for r in moe_routers(model))
    assert check.mismatched > 0  # counted before replacing
    for layer, idx in enumerate(used):
        recorded = packed[:, layer].reshape(idx.shape).long()
        valid = recorded[:, 0] >= 0
        assert torch.equal(idx[valid], recorded[valid])
    # the gate weights still come from the training pass's scores: the router gets a gradient
    logits.float().logsumexp(-1).mean().backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in moe_routers(model))
    model.zero_grad(set_to_none=True)
    # replaying the model's own routing changes nothing
    rows, routes = rollout(model, PROMPTS)
    plain = measure(model, PROMPTS, rows, routes)[3]
    replayed = measure(model, PROMPTS, rows, routes, replay=True)[3]
    assert torch.allclose(plain, replayed, atol=1e-5)


def test_engine_layout_change_is_an_error_not_a_wrong_number():
    calls = [[torch.zeros(6, 2, dtype=torch.int16), torch.zeros(2, 2, dtype=torch.int16)]]
    routes = engine_routes(calls, [3, 2], [2, 2])  # prefill [2, 3] + one decode step of both rows
    assert [r.shape for r in routes] == [(1, 4, 2), (1, 3, 2)]
    with pytest.raises(RuntimeError, match="layout changed"):
        engine_routes(calls, [3, 2], [3, 1])  # 3 tokens need 3 forward calls
    with pytest.raises(RuntimeError, match="layout changed"):
        engine_routes(calls, [3, 2], [2, 1])  # row 1 finished: the engine would have dropped it
    with pytest.raises(RuntimeError, match="layout changed"):
        engine_routes(calls, [4, 2], [2, 2])  # a prefill of [2, 4] routes 8 positions


# ================================================================== in a GRPO run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from nanoseek.data import synthetic_corpus, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.hf import save_pretrained

    root = tmp_path_factory.mktemp("consistency")
    corpus = write_corpus(synthetic_corpus(100, seed=0) +
                          ["Q: 3+4\n<think>3+4=7</think><answer>7</answer>"] * 10, root / "c.jsonl")
    tok = train_tokenizer([corpus], 300, root / "tok", progress=False)
    torch.manual_seed(0)
    save_pretrained(DeepseekV3ForCausalLM(preset("tiny", vocab_size=320, max_position_embeddings=128)),
                    root / "model")
    tok.save(root / "model")
    return root / "model"


def grpo(model_dir, out, **kw):
    from nanoseek.r1.configs import GRPOConfig
    from nanoseek.r1.grpo import run_grpo

    cfg = dict(model=str(model_dir), init_from=str(model_dir), out_dir=str(out), task="arithmetic",
               n_train=20, n_test=4, group_size=4, prompts_per_step=2, max_new_tokens=8, max_steps=2,
               lr=1e-3, mu=1, grad_accum=2, beta=0.01, eval_every=0, sample_every=0, save_every=0,
               tensorboard=False)
    cfg.update(kw)
    return run_grpo(GRPOConfig(**cfg))


def test_grpo_logs_consistency_every_step_and_diagnoses_the_run(model_dir, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("NANOSEEK_NO_PROGRESS", "1")
    trainer = grpo(model_dir, tmp_path / "plain")
    for row in trainer.history:
        assert row["logp_gap_mean"] < 1e-4 and row["logp_gap_max"] < 1e-3, row
        assert 0 <= row["routing_mismatch"] < 0.02 and 0 <= row["zero_var_groups"] <= 1
    findings = json.loads((tmp_path / "plain" / "diagnostics.json").read_text())
    assert [f["check"] for f in findings] == ["truncation", "zero-variance groups", "constant reward",
                                              "KL blow-up", "training-inference mismatch"]
    # an untrained model rambles: every completion is cut at 8 tokens, and the verdict says so
    assert trainer.history[0]["truncated"] > 0.5 and not findings[0]["ok"]
    assert "hit max_new_tokens" in capsys.readouterr().out
    # replay with mu = 2: pi_old recomputed under the rollout's routing; metrics only at inner step 1
    replayed = grpo(model_dir, tmp_path / "replay", replay_routing=True, mu=2, max_steps=4)
    steps = list(replayed.history)
    assert "routing_mismatch" in steps[0] and "routing_mismatch" not in steps[1]
    assert steps[0]["ratio"] == pytest.approx(1.0, abs=1e-5)


def test_diagnostics_verdicts():
    from nanoseek.r1.diagnostics import diagnose

    healthy = [{"step": i, "truncated": 0.0, "zero_var_groups": 0.2, "reward": 0.1 * i, "kl": 0.01,
                "logp_gap_max": 1e-6, "routing_mismatch": 0.0} for i in range(40)]
    assert all(f.ok for f in diagnose(healthy, beta=0.001))
    broken = [{"step": i, "truncated": 0.3, "zero_var_groups": 0.9, "reward": 1.5 if i > 10 else 0.1 * i,
               "kl": 0.01 * i, "logp_gap_max": 0.5, "routing_mismatch": 0.2} for i in range(60)]
    findings = diagnose(broken, beta=0.001)
    assert [f.ok for f in findings] == [False] * 5
    assert "1.5 for 49 steps" in findings[2].verdict and "to step 59" in findings[3].verdict
    assert diagnose(healthy, beta=0.0)[3].verdict.startswith("not measured")
    spike = [dict(r, kl=0.98 if r["step"] == 20 else 0.01) for r in healthy]  # one batch, not a run-away
    assert diagnose(spike, beta=0.001)[3].ok and "1 single-step spike" in diagnose(spike, beta=0.001)[3].verdict


def test_demo_says_loudly_when_grpo_was_cut_short():
    from nanoseek.demo import cut_short

    assert cut_short({"grpo_steps": 9, "grpo_planned_steps": 360})[0].startswith(
        "the GRPO stage was cut short: 9 of 360 steps")
    assert cut_short({"grpo_steps": 360, "grpo_planned_steps": 360}) == []
