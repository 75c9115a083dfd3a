"""Compiled decoding (nanoseek.inference.compiled): the static-shape step computes what the eager step
computes, and `compile=True` generates the same tokens as eager decoding, with ragged batches, stop
tokens and strings, sampling and MTP speculation. Compilation is the slow part: every compiled test
here uses the same batch size and cache length, so the module compiles three graphs (decode, verify,
MTP) once and the disk cache of inductor makes later runs quick."""

import pytest
import torch

from nanoseek.inference import LatentKVCache, SamplingParams, generate
from nanoseek.inference import compiled
from nanoseek.inference.compiled import compiler_problem, static_length, trunk_step

from test_inference import prompts_of, tiny, train_to_follow_a_rule

pytestmark = pytest.mark.usefixtures("one_thread")
NO_COMPILER = compiler_problem(torch.device("cpu"))
needs_compiler = pytest.mark.skipif(NO_COMPILER is not None, reason=f"inductor cannot compile here: {NO_COMPILER}")


def decode(ids):  # a toy detokenizer for stop strings: token t -> one letter
    return "".join(chr(65 + t % 26) for t in ids)


def test_static_length_buckets():
    assert [static_length(n) for n in (1, 128, 129, 160, 256, 257, 300, 4128, 16416)] == \
           [128, 128, 160, 160, 256, 320, 320, 5120, 20480]
    assert all(static_length(n) >= n and static_length(n) <= 1.25 * n + 128 for n in range(1, 5000, 7))


def test_static_step_matches_the_dynamic_step():
    """Same cache, same tokens: a static-shape step (whole-cache mask, slots as a tensor) gives the
    logits of the ordinary step, eagerly, to float rounding."""
    model = tiny()
    prompts = prompts_of([5, 9, 3])
    from nanoseek.inference.requests import pad_left

    ids, valid = pad_left(prompts, 0)
    caches = [LatentKVCache.for_model(model, 3, 64) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(ids, attention_mask=valid, cache=cache, logits_to_keep=1)
        tok = torch.tensor([[7], [8], [9]])
        for n in (1, 2):  # a decode step, then a two-token (verify) step
            ref = model(tok.repeat(1, n), cache=caches[0]).logits
            step = caches[1].begin_static_step(n)
            got, _ = trunk_step(model, tok.repeat(1, n), caches[1].kv_layers, step.mask, step.positions, step.slots,
                                last_only=False)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches[0].kv_layers, caches[1].kv_layers):
        torch.testing.assert_close(a, b)


@needs_compiler
def test_expert_loop_is_the_eager_experts():
    """The C++ expert loop (each chosen expert's weights read once, its copies together) computes what
    the eager MoE computes, for experts chosen by none, one and up to all of the tokens."""
    from nanoseek.inference.expert_loop import expert_loop, serves
    from nanoseek.model.moe import GroupedExperts

    experts = GroupedExperts(8, 32, 16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(9, 32)
    idx = torch.stack([torch.randperm(7)[:3] for _ in range(9)])  # expert 7 unused; 9 x 3 copies on 7 experts
    idx[:, 0] = 2  # expert 2 chosen by every token: copies in groups of 4 and a remainder
    weights = torch.rand(9, 3)
    assert serves(x, idx, experts.gate_up_proj, experts.down_proj)
    assert not serves(x[:2], idx[:2], experts.gate_up_proj, experts.down_proj)  # 6 copies, 8 experts
    with torch.inference_mode():
        torch.testing.assert_close(expert_loop(x, weights, idx, experts.gate_up_proj, experts.down_proj),
                                   experts.per_expert(x, weights, idx), rtol=1e-5, atol=1e-6)
    assert not serves(x.double(), idx, experts.gate_up_proj.double(), experts.down_proj.double())


def test_output_head_reduction_is_the_lm_head():
    """The decode step's head (a reduction per vocabulary row for few rows) computes `lm_head`."""
    model = tiny()
    with torch.inference_mode():
        for shape in [(1, 1), (4, 2), (8, 1), (3, 5)]:  # 1, 8, 8 rows: the reduction; 15: lm_head itself
            hidden = torch.randn(*shape, model.config.hidden_size)
            torch.testing.assert_close(compiled.output_head(model, hidden), model.lm_head(hidden), rtol=1e-5, atol=1e-5)


def test_many_token_copies_go_through_the_eager_experts_op():
    """Above the fused path's size the step's experts are the eager MoE's own computation, exactly."""
    model = tiny()
    moe = model.moe_layers()[0]
    x = torch.randn(1, 40, model.config.hidden_size)
    with torch.inference_mode():
        ref = moe(x)
        moe.expert_dispatcher = compiled._StepExperts(moe)
        try:
            got = moe(x)
        finally:
            moe.expert_dispatcher = None
    assert torch.equal(got, ref)
    few = x[:, :2].reshape(2, -1)
    with torch.inference_mode():
        w, idx, _ = moe.gate(few)
        fused = compiled.gathered_experts(few, w, idx, moe.experts.gate_up_proj, moe.experts.down_proj)
        torch.testing.assert_close(fused, moe.experts.per_expert(few, w, idx), rtol=1e-5, atol=1e-6)


@needs_compiler
def test_compiled_decode_gives_the_eager_tokens():
    model = tiny()
    prompts = prompts_of([5, 9, 3])  # ragged: left padding in the prefill
    greedy = SamplingParams(max_new_tokens=24)
    eager = generate(model, prompts, greedy, eos_token_id=[])
    got = generate(model, prompts, greedy, eos_token_id=[], compile=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in eager]
    for a, b in zip(eager, got):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    steps = compiled.decode_steps(model)
    assert steps.compile_seconds > 0 and not steps.failed
    # stops: a stop token ends row 0 early, a stop string row 1; the finished rows stay in the batch
    stop_tok = eager[0].token_ids[3]
    target = decode(eager[1].token_ids)[6:9]
    params = SamplingParams(max_new_tokens=24, stop_strings=[target])
    ref = generate(model, prompts, params, eos_token_id=stop_tok, decode=decode)
    rows = generate(model, prompts, params, eos_token_id=stop_tok, decode=decode, compile=True)
    assert [(r.token_ids, r.finish_reason, r.stop_reason) for r in rows] == \
           [(r.token_ids, r.finish_reason, r.stop_reason) for r in ref]
    assert rows[0].stop_reason == stop_tok and rows[1].stop_reason is not None
    # sampling: the random draws happen outside the graph, so seeded rows sample the same tokens
    sampled = SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=5)
    a = generate(model, prompts, sampled, eos_token_id=[])
    b = generate(model, prompts, sampled, eos_token_id=[], compile=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


@needs_compiler
def test_compiled_steps_read_the_live_weights():
    """The weights are inputs of the compiled step, not constants baked into it: a weight changed in place
    or a parameter replaced after compilation changes the compiled tokens as it changes the eager ones,
    without a new compilation."""
    model = tiny()
    prompts = prompts_of([5, 9, 3])
    greedy = SamplingParams(max_new_tokens=24)
    before = generate(model, prompts, greedy, eos_token_id=[], compile=True)
    steps = compiled.decode_steps(model)
    graphs = dict(steps.graphs)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    model.model.norm.weight = torch.nn.Parameter(torch.rand_like(model.model.norm.weight) + 0.5)
    eager = generate(model, prompts, greedy, eos_token_id=[])
    got = generate(model, prompts, greedy, eos_token_id=[], compile=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in eager] != [r.token_ids for r in before]
    assert steps.graphs == graphs and not steps.failed


@needs_compiler
def test_compiled_speculative_decoding_gives_the_plain_tokens():
    random_model = tiny()  # drafts at chance: rejections
    trained = train_to_follow_a_rule(tiny(), steps=60)  # mostly accepted drafts
    prompts = prompts_of([5, 9, 3])
    params = SamplingParams(max_new_tokens=24)
    for model in (random_model, trained):
        plain = generate(model, prompts, params, eos_token_id=[])
        spec = generate(model, prompts, params, eos_token_id=[], speculative=True, compile=True)
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        assert not compiled.decode_steps(model).failed
    assert sum(r.accepted for r in spec) > 0


def test_no_compiler_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "C++ compiler" in compiled.compiler_problem(torch.device("cpu"))
    model = tiny()
    prompts = prompts_of([4, 6])
    params = SamplingParams(max_new_tokens=8)
    got = generate(model, prompts, params, eos_token_id=[], compile=True)
    err = capsys.readouterr().err
    assert "no C++ compiler" in err and "decoding eagerly" in err and len(err.strip().splitlines()) == 1
    assert [r.token_ids for r in got] == [r.token_ids for r in generate(model, prompts, params, eos_token_id=[])]


@needs_compiler
def test_compiler_failure_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("C++ compile error: something broke\nmore lines")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)
    model = tiny()
    prompts = prompts_of([4, 6])
    params = SamplingParams(max_new_tokens=8)
    got = generate(model, prompts, params, eos_token_id=[], compile=True)
    err = capsys.readouterr().err
    assert "compiled decoding failed (RuntimeError: C++ compile error: something broke); decoding eagerly" in err
    assert len(err.strip().splitlines()) == 1 and compiled.decode_steps(model).failed
    assert [r.token_ids for r in got] == [r.token_ids for r in generate(model, prompts, params, eos_token_id=[])]


@needs_compiler
def test_generate_cli_compile_flag_gives_the_same_text(model_dir, capsys):
    from nanoseek.cli import main

    argv = ["generate", "--model", str(model_dir), "--prompt", "The quick", "--prompt", "brown fox",
            "--prompt", "12 + 7", "--max-new-tokens", "10", "--quiet"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    assert main(argv + ["--compile"]) == 0
    got = capsys.readouterr()
    assert got.out == eager and "warning" not in got.err
