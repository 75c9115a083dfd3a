"""GRPO math against values computed by hand, and a policy that learns a toy task.

The hand example: 2 groups x 2 completions, at most 3 completion tokens.
  rewards r = [1, 0 | 0.5, 0.5]
  group 1: mean 0.5, unbiased std sqrt(0.5) = 0.70711 -> A = +-0.70711 (a below); group 2: A = 0
  completion masks: [1,1,1], [1,1,0], [1,1,1], [1,0,0]  (9 tokens)
  ratios pi/pi_old: seq 1 [1.0, 1.5, 0.5], seq 2 [1.0, 1.3, -], seqs 3-4 anything (A = 0)
GRPO, eps 0.2:
  seq 1 (A = +a): 1a, min(1.5a, 1.2a) = 1.2a (clipped), min(0.5a, 0.8a) = 0.5a; mean 2.7a / 3 = 0.9a
  seq 2 (A = -a): -1a, min(-1.3a, -1.2a) = -1.3a (not clipped);          mean -2.3a / 2 = -1.15a
  J = (0.9a - 1.15a + 0 + 0) / 4 = -0.0625a  ->  pg_loss = 0.0625a = 0.0441942
  clip fraction 1/9.
"""

import math

import pytest
import torch

from nanoseek.r1.grpo_loss import (
    group_advantages,
    informative_groups,
    k3_kl,
    policy_loss,
    sequence_logprobs,
    token_weights,
)


pytestmark = pytest.mark.usefixtures("one_thread")


A = 0.5 / (math.sqrt(0.5) + 1e-6)  # the eps in the denominator
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.5])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float)
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.3, 1.0], [1.1, 0.9, 2.0], [0.5, 1.0, 1.0]])
OLD = torch.full((4, 3), -1.0)
NEW = OLD + RATIOS.log()


def loss(variant, eps_low=0.2, eps_high=0.2, **kw):
    adv = group_advantages(REWARDS, 2, scale_std=variant != "dr_grpo")
    w = token_weights(MASK, variant, max_len=3)
    return policy_loss(NEW, OLD, adv, w, variant=variant, eps_low=eps_low, eps_high=eps_high, **kw)


def test_advantages_by_hand():
    assert group_advantages(REWARDS, 2).tolist() == pytest.approx([A, -A, 0.0, 0.0])
    assert group_advantages(REWARDS, 2, scale_std=False).tolist() == pytest.approx([0.5, -0.5, 0, 0])
    assert informative_groups(REWARDS, 2).tolist() == [True, False]
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 3)


def test_token_weights_by_hand():
    grpo = token_weights(MASK, "grpo")
    assert grpo[0].tolist() == pytest.approx([1 / 12] * 3)  # 1 / (N=4 * |o|=3)
    assert grpo[1].tolist() == pytest.approx([1 / 8, 1 / 8, 0])
    assert grpo[3].tolist() == pytest.approx([1 / 4, 0, 0])
    assert token_weights(MASK, "dapo").sum() == pytest.approx(1.0)
    assert token_weights(MASK, "dapo")[0, 0] == pytest.approx(1 / 9)
    assert token_weights(MASK, "dr_grpo", max_len=3)[1, 0] == pytest.approx(1 / 12)
    truncated = MASK.clone()
    truncated[0] = 0  # a masked-out completion does not count in N
    assert token_weights(truncated, "grpo")[1, 0] == pytest.approx(1 / 6)


def test_grpo_loss_by_hand():
    out = loss("grpo")
    assert out.pg_loss.item() == pytest.approx(0.0625 * A, rel=1e-5)
    assert out.loss.item() == pytest.approx(0.0625 * A, rel=1e-5)  # no reference: no KL term
    assert out.clip_frac == pytest.approx(1 / 9)
    assert out.kl.item() == 0.0


def test_dapo_clip_higher_and_token_mean_by_hand():
    # seq 1: 1a + min(1.5a, 1.28a) + 0.5a = 2.78a; seq 2: -2.3a; token mean over 9 tokens
    out = loss("dapo", 0.2, 0.28)
    assert out.pg_loss.item() == pytest.approx(-(2.78 - 2.3) * A / 9, rel=1e-5)


def test_dr_grpo_by_hand():
    # A = +-0.5, no std. seq 1: 0.5 + min(0.75, 0.6) + min(0.25, 0.4) = 1.35; seq 2: -0.5 - 0.65
    # J = (1.35 - 1.15) / (N=4 * L=3)
    assert loss("dr_grpo").pg_loss.item() == pytest.approx(-0.2 / 12, rel=1e-5)


def test_gspo_sequence_ratio_by_hand():
    s1 = 0.75 ** (1 / 3)  # exp(mean(log [1, 1.5, 0.5]))
    s2 = math.sqrt(1.3)  # exp(mean(log [1, 1.3]))
    out = loss("gspo", 0.3, 0.3)  # wide enough that neither is clipped
    assert out.pg_loss.item() == pytest.approx(-(s1 * A - s2 * A) / 4, rel=1e-5)
    assert out.clip_frac == 0.0
    tight = loss("gspo", 0.05, 0.05)  # s2 = 1.14 > 1.05 with A < 0: min picks -1.14a (unclipped)
    assert tight.pg_loss.item() == pytest.approx(-(s1 * A - s2 * A) / 4, rel=1e-5)
    tight = policy_loss(NEW, OLD, torch.tensor([-A, A, 0.0, 0.0]), token_weights(MASK, "gspo"),
                        variant="gspo", eps_low=0.05, eps_high=0.05)
    # now seq 1 (s1 = 0.909, A = -a): min(-0.909a, -0.95a) = -0.95a, clipped; seq 2: min(1.14a, 1.05a)
    assert tight.pg_loss.item() == pytest.approx(-(-0.95 * A + 1.05 * A) / 4, rel=1e-5)
    assert tight.clip_frac == pytest.approx(0.5)  # 2 of the 4 sequences (A = 0 never clips)


def test_k3_kl_by_hand():
    # d = log pi_ref - log pi: d = ln 2 -> 2 - ln 2 - 1 = 0.306853; d = -ln 2 -> 0.5 + ln 2 - 1
    ref = NEW.clone()
    ref[0, 0] += math.log(2)
    ref[2, 0] -= math.log(2)
    kl = k3_kl(NEW, ref)
    assert kl[0, 0].item() == pytest.approx(0.306853, abs=1e-6)
    assert kl[2, 0].item() == pytest.approx(0.193147, abs=1e-6)
    out = loss("grpo", beta=0.1, ref_logp=ref)
    # grpo weights 1/12 on both tokens: (0.306853 + 0.193147) / 12 = 0.5 / 12
    assert out.kl.item() == pytest.approx(0.5 / 12, rel=1e-5)
    assert out.loss.item() == pytest.approx(0.0625 * A + 0.1 * 0.5 / 12, rel=1e-5)


def test_mu1_ratio_is_one_and_gradient_is_policy_gradient():
    logp = NEW.clone().requires_grad_(True)
    adv = group_advantages(REWARDS, 2)
    w = token_weights(MASK, "grpo")
    out = policy_loss(logp, logp.detach(), adv, w)
    out.loss.backward()
    assert out.pg_loss.item() == pytest.approx(-(adv[:, None] * w).sum().item(), abs=1e-7)
    assert torch.allclose(logp.grad, -adv[:, None] * w)  # d/dlogp of -w A rho at rho = 1


def test_micro_batches_sum_to_the_full_batch():
    adv = group_advantages(REWARDS, 2)
    w = token_weights(MASK, "dapo")
    full = policy_loss(NEW, OLD, adv, w, variant="dapo", eps_high=0.28).loss
    parts = sum(policy_loss(NEW[r], OLD[r], adv[r], w[r], variant="dapo", eps_high=0.28).loss
                for r in (slice(0, 1), slice(1, 4)))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_sequence_logprobs_are_aligned_with_tokens():
    logits = torch.randn(2, 4, 5)
    ids = torch.randint(0, 5, (2, 4))
    logp, entropy = sequence_logprobs(logits, ids, temperature=2.0)
    expected = (logits[0, 1] / 2).log_softmax(-1)[ids[0, 2]]
    assert logp[0, 2].item() == pytest.approx(expected.item(), abs=1e-6)
    assert logp[:, 0].abs().sum() == 0 and entropy.shape == (2, 4)


def test_policy_learns_toy_task():
    """A tiny model, one prompt, one generated token, reward 1 - |token - 7| / V: GRPO must move
    the policy to the optimum (token 7) in a few dozen steps."""
    from nanoseek.config import preset
    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.r1.rollout import generate_completions

    torch.manual_seed(0)
    V, G = 24, 16
    cfg = preset("tiny", vocab_size=V, hidden_size=32, num_hidden_layers=1, first_k_dense_replace=1,
                 num_nextn_predict_layers=0, max_position_embeddings=16)
    model = DeepseekV3ForCausalLM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    prompt = [1, 5, 9]

    def p_target() -> float:
        with torch.no_grad():
            return model(torch.tensor([prompt])).logits[0, -1].softmax(-1)[7].item()

    before = p_target()
    for step in range(40):
        comps = generate_completions(model, [prompt] * G, max_new_tokens=1, eos_id=-1,
                                     temperature=1.0, seed=1000 * step)
        tokens = torch.tensor([c.tokens[0] for c in comps])
        rewards = 1 - (tokens - 7).abs().float() / V
        ids = torch.cat([torch.tensor([prompt] * G), tokens[:, None]], dim=1)
        mask = torch.zeros_like(ids, dtype=torch.float)
        mask[:, -1] = 1
        logp, _ = sequence_logprobs(model(ids).logits, ids)
        out = policy_loss(logp, logp.detach(), group_advantages(rewards, G),
                          token_weights(mask, "grpo"))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = p_target()
    assert before < 0.1 and after > 0.5, (before, after)
