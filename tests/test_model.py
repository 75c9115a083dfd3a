"""Model behaviour: router properties, MTP gradients, auxiliary-loss-free balancing, config checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.config import ConfigError, ModelConfig, preset
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.model.moe import combine, dispatch
from nanoseek.model.router import Router


@st.composite
def router_cases(draw):
    n_group = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(2, 4))
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, topk_group * per_group))
    cfg = preset("tiny", n_routed_experts=n_group * per_group, n_group=n_group, topk_group=topk_group,
                 num_experts_per_tok=top_k, routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])))
    seed = draw(st.integers(0, 2**16))
    return cfg, seed


@settings(max_examples=60, deadline=None)
@given(router_cases())
def test_router_properties(case):
    cfg, seed = case
    g = torch.Generator().manual_seed(seed)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 1, generator=g)
        router.e_score_correction_bias.normal_(0, 0.5, generator=g)
    x = torch.randn(16, cfg.hidden_size, generator=g)
    weights, idx, scores = router(x)
    # weights come from the unbiased sigmoid scores, renormalised and scaled
    picked = torch.sigmoid(x @ router.weight.T).gather(1, idx)
    torch.testing.assert_close(weights, picked / picked.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    torch.testing.assert_close(weights.sum(-1), torch.full((16,), cfg.routed_scaling_factor))
    # distinct experts, all inside the kept groups, and the kept groups are the best by top-2 biased score
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
    per_group = cfg.n_routed_experts // cfg.n_group
    biased = (scores + router.e_score_correction_bias).view(16, cfg.n_group, per_group)
    group_score = biased.topk(min(2, per_group), dim=-1).values.sum(-1)
    kept = group_score.topk(cfg.topk_group, dim=-1).indices
    for t in range(16):
        assert set((idx[t] // per_group).tolist()) <= set(kept[t].tolist())
    # selection follows the biased scores: every chosen expert beats every unchosen one in a kept group
    for t in range(16):
        allowed = torch.cat([torch.arange(k * per_group, (k + 1) * per_group) for k in kept[t].tolist()])
        others = [e for e in allowed.tolist() if e not in idx[t].tolist()]
        if others:
            b = scores[t] + router.e_score_correction_bias
            assert b[idx[t]].min() >= b[others].max()


def test_bias_changes_selection_not_weights():
    cfg = preset("tiny")
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(32, cfg.hidden_size)
    w0, i0, _ = router(x)
    with torch.no_grad():
        router.e_score_correction_bias[i0[0, 0]] = -10.0  # ban token 0's first expert
    w1, i1, s1 = router(x)
    assert i0[0, 0] not in i1[0].tolist()
    torch.testing.assert_close(w1[0] / cfg.routed_scaling_factor,
                               s1[0, i1[0]] / s1[0, i1[0]].sum())


def test_dispatch_combine_roundtrip():
    x = torch.randn(10, 8)
    idx = torch.randint(0, 4, (10, 3))
    rows, plan = dispatch(x, idx, 4)
    assert plan.offsets[-1] == 30 and plan.counts.tolist() == torch.bincount(idx.flatten(), minlength=4).tolist()
    weights = torch.rand(10, 3)
    torch.testing.assert_close(combine(rows, plan, weights), x * weights.sum(1, keepdim=True))


def test_mtp_loss_gradients_reach_the_trunk():
    model = DeepseekV3ForCausalLM(preset("tiny", aux_loss_alpha=0.0))
    x = torch.randint(0, 512, (2, 24))
    out = model(x, labels=x)
    out.mtp_loss.backward()
    trunk = model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.grad
    assert trunk is not None and trunk.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0


def test_loss_is_lm_plus_weighted_mtp_plus_balance():
    model = DeepseekV3ForCausalLM(preset("tiny", aux_loss_alpha=0.01))
    x = torch.randint(0, 512, (2, 24))
    out = model(x, labels=x, mtp_weight=0.3)
    assert out.balance_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * out.mtp_loss + out.balance_loss)
    model.eval()
    assert model(x, labels=x).balance_loss is None  # balance loss is a training-only term


def test_balance_loss_zero_alpha_disables():
    model = DeepseekV3ForCausalLM(preset("tiny", aux_loss_alpha=0.0))
    assert model(torch.randint(0, 512, (1, 8)), labels=torch.randint(0, 512, (1, 8))).balance_loss is None


def test_bias_updates_balance_a_skewed_router():
    cfg = preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                 num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    model = DeepseekV3ForCausalLM(cfg).train()
    moe = model.moe_layers()[0]
    with torch.no_grad():  # skew: a shared direction makes a few experts win every token
        moe.gate.weight.normal_(0, 0.02)
        moe.gate.weight[:3] += 0.5
    x = torch.randint(0, cfg.vocab_size, (8, 64))

    def imbalance():
        with torch.no_grad():
            model(x)
        load = moe.update_bias(gamma=0.0)  # measure without moving the bias
        return (load.max() / load.mean()).item()

    before = imbalance()
    for step in range(400):
        with torch.no_grad():
            model(x)
        moe.update_bias(gamma=0.01 if step < 300 else 0.002)  # V3 also lowers gamma late in training
    after = imbalance()
    assert before > 2.0 and after < 1.2, (before, after)


def test_forward_is_deterministic():
    model = DeepseekV3ForCausalLM(preset("tiny")).train()
    x = torch.randint(0, 512, (2, 16))
    a = model(x, labels=x).loss
    b = model(x, labels=x).loss
    assert torch.equal(a, b)


@pytest.mark.parametrize("change, field", [
    (dict(n_group=3), "n_group"),
    (dict(topk_group=3), "topk_group"),
    (dict(num_experts_per_tok=5, topk_group=1), "num_experts_per_tok"),
    (dict(rope_scaling={"rope_type": "ntk-magic"}), "rope_scaling"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
])
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        preset("tiny", **change)


def test_config_json_roundtrip_accepts_both_rope_spellings(tmp_path):
    cfg = preset("v3-671b")
    cfg.save(tmp_path)
    assert ModelConfig.from_json(tmp_path) == cfg
    d = cfg.to_dict()
    d.pop("rope_scaling")  # transformers 5 writes only rope_parameters
    assert ModelConfig.from_dict(d).rope_scaling["factor"] == 40
    assert ModelConfig.from_dict(d).softmax_scale == pytest.approx(0.135234, abs=1e-6)


def test_671b_builds_on_meta_for_counting():
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(preset("v3-671b"))
    mtp = sum(p.numel() for p in model.mtp.parameters())
    main = model.num_parameters() - mtp
    assert abs(main - 671e9) / 671e9 < 0.01  # V3 report: 671B main model
    # + 14B MTP module, which stores its own embedding and head copies (2 x 0.93B) in checkpoints
    assert abs(mtp + 2 * 129280 * 7168 - 14e9) / 14e9 < 0.05


def test_packed_mask_equals_running_the_segments_separately():
    """A block-diagonal bool [B, 1, T, T] mask with per-segment positions: loss pieces (trunk and MTP)
    equal those of each segment run alone, and labels of -100 are ignored."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(preset("tiny", aux_loss_alpha=0.0)).eval()
    a, b = torch.randint(3, 512, (1, 9)), torch.randint(3, 512, (1, 7))
    ids = torch.cat([a, b], dim=1)
    seg = torch.tensor([[1] * 9 + [2] * 7])
    mask = (torch.ones(16, 16, dtype=torch.bool).tril() & (seg[:, :, None] == seg[:, None, :]))[:, None]
    positions = torch.cat([torch.arange(9), torch.arange(7)])[None]
    packed = model(ids, attention_mask=mask, position_ids=positions, return_hidden=True)
    alone = torch.cat([model(a, return_hidden=True).hidden_states, model(b, return_hidden=True).hidden_states], 1)
    torch.testing.assert_close(packed.hidden_states, alone, atol=1e-5, rtol=1e-5)
    # Loss on b's tokens 2.. only (-100 elsewhere), so no target is predicted from across the boundary
    # (MTP depth 1 predicts two ahead: from a's last position it would target b's second token).
    labels = torch.full_like(ids, -100)
    labels[:, 11:] = ids[:, 11:]
    out = model(ids, labels=labels, attention_mask=mask, position_ids=positions, mtp_weight=0.5)
    b_labels = b.clone()
    b_labels[:, :2] = -100
    ref = model(b, labels=b_labels, mtp_weight=0.5)
    torch.testing.assert_close(out.lm_loss, ref.lm_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mtp_loss, ref.mtp_loss, atol=1e-5, rtol=1e-5)
    unmasked = model(ids, labels=labels, position_ids=positions, mtp_weight=0.5)
    assert not torch.allclose(unmasked.mtp_loss, ref.mtp_loss, atol=1e-3)  # the mask reaches the MTP module
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.mtp_loss)


def test_padding_mask_two_d_and_four_d_agree():
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(preset("tiny")).eval()
    ids = torch.randint(3, 512, (2, 10))
    pad = torch.ones(2, 10, dtype=torch.long)
    pad[1, :4] = 0
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    four_d = causal & (pad.bool()[:, None, None, :] | torch.eye(10, dtype=torch.bool))
    two = model(ids, labels=ids, attention_mask=pad)
    four = model(ids, labels=ids, attention_mask=four_d)
    assert torch.equal(two.logits, four.logits) and torch.equal(two.mtp_loss, four.mtp_loss)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=four_d.float())


def test_no_stale_balance_loss_from_layers_that_did_not_run():
    model = DeepseekV3ForCausalLM(preset("tiny", aux_loss_alpha=0.01)).train()
    x = torch.randint(0, 512, (2, 12))
    with_mtp = model(x, labels=x, mtp_weight=0.3)
    without = model(x, labels=x, mtp_weight=0.0)  # the MTP block's MoE does not run
    n_trunk = len([m for m in model.model.modules() if m.__class__.__name__ == "MoE"])
    assert sum(m.balance_loss is not None for m in model.moe_layers()) == n_trunk
    assert without.balance_loss < with_mtp.balance_loss
    torch.testing.assert_close(without.loss, without.lm_loss + without.balance_loss)


def test_few_token_expert_loop_matches_grouped_experts():
    """The CPU per-expert route computes the same MoE output, gradients and expert loads as the grouped
    route, for one token and for several; the route is chosen by the token count."""
    cfg = preset("tiny", n_routed_experts=8, num_experts_per_tok=2, aux_loss_alpha=0.0)
    torch.manual_seed(0)
    moe = DeepseekV3ForCausalLM(cfg).moe_layers()[0].train()
    assert moe.few_tokens(torch.zeros(1, cfg.hidden_size)) and not moe.few_tokens(torch.zeros(2, cfg.hidden_size))
    for n in (1, 5):
        x = torch.randn(1, n, cfg.hidden_size, requires_grad=True)
        results = []
        for loop in (True, False):
            moe.few_tokens = lambda flat, loop=loop: loop
            moe.expert_load.zero_()
            out = moe(x)
            grads = torch.autograd.grad(out.sum(), [x, moe.experts.gate_up_proj, moe.experts.down_proj])
            results.append((out, grads, moe.expert_load.clone()))
        (a, ga, la), (b, gb, lb) = results
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5)
        assert torch.equal(la, lb) and la.sum() == n * 2
