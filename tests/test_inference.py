"""Inference engine: absorbed MLA over the latent cache, batched sampling, stopping, MTP speculative
decoding, and token-for-token parity with transformers' greedy `generate`."""

import math

import pytest
import torch

import nanoseek
from nanoseek.config import preset
from nanoseek.inference import Generation, LatentKVCache, PromptError, SamplingParams, generate, stream
from nanoseek.inference.sampling import Sampler, filter_logits
from nanoseek.inference.speculative import Drafts, accept_drafts


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    torch.manual_seed(0)
    return nanoseek.DeepseekV3ForCausalLM(preset("tiny", **overrides)).eval()


def forward_cached(model, ids, cache, valid=None):
    """The model's own forward over the cache: final normed hidden states of the new tokens."""
    return model(ids, attention_mask=valid, cache=cache, return_hidden=True).hidden_states


def prompts_of(lengths, vocab=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------- cache + MLA
def test_absorbed_decode_matches_full_forward():
    model = tiny()
    x = torch.randint(0, 512, (2, 60))
    with torch.inference_mode():
        ref = model(x).logits
        cache = LatentKVCache.for_model(model, 2, 64)
        chunks = [forward_cached(model, x[:, :17], cache)]  # prefill, then chunks of 3, then 1 token at a time
        chunks += [forward_cached(model, x[:, t:t + 3], cache) for t in range(17, 29, 3)]
        chunks += [forward_cached(model, x[:, t:t + 1], cache) for t in range(29, 60)]
        got = model.lm_head(torch.cat(chunks, dim=1))
    assert (got - ref).abs().max().item() < 1e-4
    assert cache.lengths.tolist() == [60, 60] and cache.slot == 60


def test_absorbed_decode_ragged_left_padding():
    model = tiny(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "mscale": 1.0, "mscale_all_dim": 1.0})
    rows = prompts_of([9, 20, 4])
    P = 20
    ids = torch.zeros(3, P, dtype=torch.long)
    valid = torch.zeros(3, P, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, P - len(r):], valid[i, P - len(r):] = torch.tensor(r), True
    tail = torch.randint(0, 512, (3, 25))
    with torch.inference_mode():
        cache = LatentKVCache.for_model(model, 3, 64)
        hidden = [forward_cached(model, ids, cache, valid)]
        hidden += [forward_cached(model, tail[:, t:t + 1], cache) for t in range(25)]
        got = model.lm_head(torch.cat(hidden, dim=1))
        for i, r in enumerate(rows):  # each row alone, unpadded, full sequence
            ref = model(torch.tensor([r + tail[i].tolist()])).logits[0]
            assert (got[i, P - len(r):] - ref).abs().max().item() < 1e-4
    assert cache.lengths.tolist() == [9 + 25, 20 + 25, 4 + 25]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token_is_the_latent_formula(dtype):
    cfg = preset("tiny")
    cache = LatentKVCache(cfg.num_hidden_layers, 3, 100, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype=dtype)
    itemsize = torch.finfo(dtype).bits // 8
    assert cache.bytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * itemsize
    # V3 in BF16: (kv_lora_rank 512 + rope 64) x 61 layers x 2 bytes (DeepSeek-V3 technical report, §2.1.1)
    v3 = preset("v3-671b")
    assert (v3.kv_lora_rank + v3.qk_rope_head_dim) * v3.num_hidden_layers * 2 == 70_272


# ---------------------------------------------------------------------------------------- parity with transformers
def test_greedy_matches_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny", num_nextn_predict_layers=0)
    torch.manual_seed(0)
    nanoseek.DeepseekV3ForCausalLM(cfg).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = nanoseek.from_pretrained(tmp_path).eval()

    def hf_generate(ids, mask, eos=None):  # None: the config's eos, as ours
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                               eos_token_id=eos)

    single = torch.tensor(prompts_of([11]))
    equal = torch.tensor(prompts_of([8, 8, 8], seed=2))
    for ids in (single, equal):
        got = ours.generate(ids, max_new_tokens=24, pad_token_id=0)
        assert got.shape == (ids.shape[0], ids.shape[1] + 24)
        assert torch.equal(got, hf_generate(ids, torch.ones_like(ids)))
    # ragged batch, left-padded, with an eos that ends one row early (found from an unstopped run)
    rows = prompts_of([7, 12, 3], seed=3)
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 12 - len(r):], mask[i, 12 - len(r):] = torch.tensor(r), 1
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    eos = int(free[2, 12 + 5])
    ref = hf_generate(ids, mask, [eos])
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[eos], pad_token_id=0)
    assert torch.equal(got, ref)
    assert (got[2, 12 + 6:] == 0).all()  # the stopped row is padded


# ---------------------------------------------------------------------------------------------- engine
def test_rows_do_not_depend_on_batch_composition():
    model = tiny()
    prompts = prompts_of([5, 13, 2, 9])
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=[11, 12, 13, 14])
    together = generate(model, prompts, params, eos_token_id=[])
    for i in (0, 2):
        alone = generate(model, [prompts[i]], SamplingParams(**{**vars(params), "seed": [11 + i]}),
                         eos_token_id=[])[0]
        assert alone.token_ids == together[i].token_ids
        assert max(abs(a - b) for a, b in zip(alone.logprobs, together[i].logprobs)) < 1e-4
    again = generate(model, prompts, params, eos_token_id=[])
    assert [r.token_ids for r in again] == [r.token_ids for r in together]
    other = generate(model, prompts, SamplingParams(**{**vars(params), "seed": 0}), eos_token_id=[])
    assert [r.token_ids for r in other] != [r.token_ids for r in together]


def test_logprobs_are_those_of_the_model():
    model = tiny()
    prompt = prompts_of([6])[0]
    for temperature in (0.0, 0.7):
        row = generate(model, [prompt], SamplingParams(max_new_tokens=12, temperature=temperature, top_k=5, seed=3),
                       eos_token_id=[])[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + row.token_ids])).logits[0, len(prompt) - 1:-1]
        scale = temperature or 1.0
        ref = (logits / scale).log_softmax(-1).gather(-1, torch.tensor(row.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(row.logprobs), ref, atol=1e-4)


def test_stop_tokens_strings_and_lengths():
    model = tiny()
    prompts = prompts_of([4, 6])
    free = generate(model, prompts, SamplingParams(max_new_tokens=30), eos_token_id=[])
    # a stop token: the row's 4th token
    stop_tok = free[0].token_ids[3]
    rows = generate(model, prompts, SamplingParams(max_new_tokens=30), eos_token_id=stop_tok)
    first = free[0].token_ids.index(stop_tok)
    assert rows[0].token_ids == free[0].token_ids[:first + 1]
    assert (rows[0].finish_reason, rows[0].stop_reason) == ("stop", stop_tok)
    # a stop string, with a toy decoder: token t -> chr(65 + t % 26)

    def decode(ids):
        return "".join(chr(65 + t % 26) for t in ids)

    text = decode(free[1].token_ids)
    target = text[7:10]
    end = text.index(target) + len(target)
    rows = generate(model, prompts, SamplingParams(max_new_tokens=30, stop_strings=[target]), eos_token_id=[],
                    decode=decode)
    assert rows[1].token_ids == free[1].token_ids[:end]
    assert (rows[1].finish_reason, rows[1].stop_reason, rows[1].text) == ("stop", target, text[:end])
    # length: max_new_tokens, and the context limit
    assert all(r.finish_reason == "length" and len(r.token_ids) == 30 for r in free)
    near = prompts_of([preset("tiny").max_position_embeddings - 5])
    row = generate(model, near, SamplingParams(max_new_tokens=30), eos_token_id=[])[0]
    assert len(row.token_ids) == 5 and row.finish_reason == "length"
    with pytest.raises(ValueError, match="decode"):
        generate(model, prompts, SamplingParams(stop_strings=["x"]))


def test_stream_yields_the_same_tokens_and_leaves_grad_mode_alone():
    model = tiny()
    prompts = prompts_of([3, 8, 5])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5)
    run = Generation(model, prompts, params, eos_token_id=[])
    seen = [[] for _ in prompts]
    for event in run:
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        seen[event.index].append(event.token_id)
        assert (event.finish_reason is not None) == (len(seen[event.index]) == 10)
    assert seen == [r.token_ids for r in run.completions]
    assert seen == [r.token_ids for r in generate(model, prompts, params, eos_token_id=[])]
    assert len(list(stream(model, prompts, params, eos_token_id=[]))) == 30


def test_finished_rows_are_dropped_without_changing_the_others():
    model = tiny()
    prompts = prompts_of([5, 7, 6, 9])
    free = generate(model, prompts, SamplingParams(max_new_tokens=25), eos_token_id=[])
    # stop tokens that end rows 0-2 early, so the batch shrinks while row 3 runs on
    stops = [free[i].token_ids[2 + i] for i in range(3)]
    stops = [t for t in stops if t not in free[3].token_ids]
    rows = generate(model, prompts, SamplingParams(max_new_tokens=25), eos_token_id=stops)
    assert sum(r.finish_reason == "stop" for r in rows) >= 2
    assert rows[3].token_ids == free[3].token_ids
    for r, f in zip(rows, free):
        n = len(r.token_ids)
        assert r.token_ids == f.token_ids[:n]


def test_prompt_errors():
    model = tiny()
    with pytest.raises(PromptError, match="empty"):
        generate(model, [[1, 2], []])
    with pytest.raises(PromptError, match="context"):
        generate(model, [[1] * preset("tiny").max_position_embeddings])
    with pytest.raises(PromptError, match="vocabulary"):
        generate(model, [[1, 512]])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], SamplingParams(top_p=0))


def test_hf_style_generate_api():
    model = tiny()
    ids = torch.tensor(prompts_of([5, 5]))
    out = model.generate(ids, max_new_tokens=7, eos_token_id=[])
    assert out.shape == (2, 12) and torch.equal(out[:, :5], ids)
    sampled = model.generate(ids, max_new_tokens=7, do_sample=True, seed=0, eos_token_id=[])
    assert torch.equal(sampled, model.generate(ids, max_new_tokens=7, do_sample=True, seed=0, eos_token_id=[]))
    assert model.generate(ids[0], max_new_tokens=3).shape[0] == 1


# ---------------------------------------------------------------------------------------------- sampling
def test_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).log_softmax(-1)
    probs = logits.softmax(-1)[0]
    kept = lambda p: torch.isfinite(filter_logits(logits, p))[0].tolist()  # noqa: E731
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [True, True, False, False, False]
    # top-p keeps the smallest prefix whose mass reaches p
    p2 = float(probs[:2].sum())
    assert kept(SamplingParams(temperature=1.0, top_p=p2 - 1e-3)) == [True, True, False, False, False]
    assert kept(SamplingParams(temperature=1.0, top_p=p2 + 1e-3)) == [True, True, True, False, False]
    threshold = float(probs[2] / probs[0])
    assert kept(SamplingParams(temperature=1.0, min_p=threshold - 1e-3)) == [True, True, True, False, False]
    assert kept(SamplingParams(temperature=1.0, min_p=1.0)) == [True, False, False, False, False]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0]).repeat(4000, 1)
    for temperature in (1.0, 0.5):
        sampler = Sampler(SamplingParams(temperature=temperature, seed=0), 4000)
        tokens, logprobs = sampler(logits)
        freq = torch.bincount(tokens, minlength=4) / 4000
        expected = (logits[0] / temperature).softmax(-1)
        assert (freq - expected).abs().max() < 0.03
        assert torch.allclose(logprobs, expected.log()[tokens], atol=1e-5)


def test_speculative_acceptance_rule_samples_the_target():
    """Speculative sampling: whatever the draft distribution q, emitted y0 ~ p."""
    torch.manual_seed(0)
    n, V = 20000, 5
    p_logits = torch.tensor([0.5, 1.5, -1.0, 0.0, 1.0])
    q = torch.tensor([0.1, 0.1, 0.5, 0.2, 0.1]).repeat(n, 1)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0), n)
    draft = sampler.choose(q)
    logits = torch.stack([p_logits, torch.zeros(V)]).repeat(n, 1, 1)
    accepted, y0, _ = accept_drafts(sampler, logits, Drafts(torch.zeros(n, dtype=torch.long), draft, q))
    freq = torch.bincount(y0, minlength=V) / n
    assert (freq - p_logits.softmax(-1)).abs().max() < 0.015
    expected_acceptance = torch.minimum(p_logits.softmax(-1), q[0]).sum()  # sum_x min(p, q)
    assert abs(accepted.float().mean() - expected_acceptance) < 0.015


# ---------------------------------------------------------------------------------------------- speculative
def train_to_follow_a_rule(model, steps=150):
    """Teach a tiny model x[i+1] = (5 x[i] + 3) mod 64 (so MTP drafts get accepted)."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.empty(16, 24, dtype=torch.long)
        x[:, 0] = torch.randint(0, 64, (16,), generator=g)
        for t in range(1, 24):
            x[:, t] = (5 * x[:, t - 1] + 3) % 64
        loss = model(x, labels=x, mtp_weight=1.0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_speculative_greedy_is_identical_to_plain_decoding():
    random_model = tiny()  # drafts at chance: exercises rejection
    trained = train_to_follow_a_rule(tiny())  # drafts mostly right: exercises acceptance
    prompts = prompts_of([5, 9, 3, 12]) + [[7, 38, 1]]
    params = SamplingParams(max_new_tokens=30)
    for model in (random_model, trained):
        plain = generate(model, prompts, params, eos_token_id=[])
        spec = generate(model, prompts, params, eos_token_id=[], speculative=True)
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        for a, b in zip(plain, spec):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    rate = sum(r.accepted for r in spec) / sum(r.drafted for r in spec)
    assert rate > 0.5, rate
    steps = sum(r.drafted for r in spec) + len(spec)  # verify steps + the prefill
    assert steps < sum(len(r.token_ids) for r in spec)  # fewer forwards than tokens
    # stops inside an accepted pair end the row at the right token
    stop = plain[-1].token_ids[6]
    cut = generate(trained, prompts[-1:], params, eos_token_id=stop, speculative=True)[0]
    assert cut.token_ids == plain[-1].token_ids[:plain[-1].token_ids.index(stop) + 1]


def test_speculative_sampling_is_reproducible_and_needs_mtp():
    model = train_to_follow_a_rule(tiny(), steps=60)
    prompts = prompts_of([4, 7])
    params = SamplingParams(max_new_tokens=20, temperature=0.8, seed=[1, 2])
    a = generate(model, prompts, params, eos_token_id=[], speculative=True)
    b = generate(model, prompts, params, eos_token_id=[], speculative=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(len(r.token_ids) == 20 and all(math.isfinite(x) for x in r.logprobs) for r in a)
    with pytest.raises(ValueError, match="MTP"):
        generate(tiny(num_nextn_predict_layers=0), prompts, params, speculative=True)


def test_bfloat16_model_decodes_close_to_float32():
    ref_model = tiny()
    model = tiny().to(torch.bfloat16)
    for moe in model.moe_layers():
        moe.gate.float()
    x = torch.randint(0, 512, (2, 30))
    with torch.inference_mode():
        ref = ref_model(x).logits
        cache = LatentKVCache.for_model(model, 2, 32)
        assert cache.layer(0).dtype == torch.bfloat16
        got = model.lm_head(torch.cat([forward_cached(model, x[:, :20], cache)]
                                      + [forward_cached(model, x[:, t:t + 1], cache) for t in range(20, 30)], 1))
    # bf16 rounding can flip a near-tied expert choice for a token or two; everywhere else it is close
    per_token = (got.float() - ref).abs().amax(-1)
    assert (per_token < 0.02).float().mean() > 0.9, per_token
    rows = generate(model, x[:, :5].tolist(), SamplingParams(max_new_tokens=8, temperature=0.8, seed=0),
                    eos_token_id=[])
    assert all(len(r.token_ids) == 8 and all(math.isfinite(v) for v in r.logprobs) for r in rows)
