"""The serving engine loop (nanoseek.serve.engine_loop) without HTTP: continuous batching gives every
request the tokens of generating it alone (batch invariance), seeded sampling is reproducible,
speculative decoding works inside the running batch, cancellation frees cache blocks, a fault in one
request fails that request alone, the queue is bounded, and stopping fails what is still open."""

import threading
import time

import pytest
import torch

import nanoseek
from nanoseek.config import preset
from nanoseek.inference import SamplingParams, generate
from nanoseek.inference.requests import PromptError
from nanoseek.serve.engine_loop import (EngineLoop, QueueFull, Request, RequestDone, RequestFailed, ShuttingDown,
                                        TokenOut)

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT = 60


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nanoseek.DeepseekV3ForCausalLM(preset("tiny")).eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


class Collector:
    """A request's sink: keeps what the engine sends, thread-safely."""

    def __init__(self):
        self.items, self.done = [], threading.Event()

    def __call__(self, item):
        self.items.append(item)
        if isinstance(item, (RequestDone, RequestFailed)):
            self.done.set()

    def tokens(self, choice=0):
        return [i.token_id for i in self.items if isinstance(i, TokenOut) and i.choice == choice]

    def logprobs(self, choice=0):
        return [i.logprob for i in self.items if isinstance(i, TokenOut) and i.choice == choice]

    def wait(self):
        assert self.done.wait(TIMEOUT), "request did not finish"
        return self.items[-1]


def submit(engine, prompts, params, top=0):
    sink = Collector()
    sink.request = Request(prompts, params, sink, top)
    engine.submit(sink.request)
    return sink


def wait_until(condition, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def engine(model):
    engines = []

    def make(**kw):
        e = EngineLoop(model, eos_token_id=kw.pop("eos_token_id", None), decode=kw.pop("decode", None),
                       **{"max_batch": 8, "queue": 8, "block_size": 4, **kw})
        engines.append(e)
        e.start()
        return e
    yield make
    for e in engines:
        e.stop()


def test_greedy_rows_equal_offline_whatever_shares_the_batch(model, engine):
    eng = engine()
    prompts = prompts_of([6, 13, 3, 9], seed=1)
    limits = [24, 7, 12, 1]
    alone = [generate(model, [p], SamplingParams(max_new_tokens=n))[0] for p, n in zip(prompts, limits)]
    first = submit(eng, [prompts[0]], SamplingParams(max_new_tokens=limits[0]))
    wait_until(lambda: len(first.items) >= 4)  # the others join a batch that is already decoding
    rest = [submit(eng, [p], SamplingParams(max_new_tokens=n)) for p, n in zip(prompts[1:], limits[1:])]
    for sink, ref in zip([first, *rest], alone):
        assert isinstance(sink.wait(), RequestDone)
        assert sink.tokens() == ref.token_ids
        assert max(abs(a - b) for a, b in zip(sink.logprobs(), ref.logprobs)) < 1e-4
        assert [i.finish_reason for i in sink.items if isinstance(i, TokenOut)][-1] == "length"
    assert max(eng.stats.batch_sizes) >= 3  # they did share the batch
    wait_until(lambda: eng.load()["running_rows"] == 0)
    assert eng.pool.free_blocks == eng.pool.capacity_blocks  # every block came back


def test_seeded_sampling_is_reproducible_and_batch_independent(model, engine):
    eng = engine()
    p = prompts_of([7], seed=2)[0]
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    offline = generate(model, [p] * 3, params)  # choice i samples with seed + i, as prompt i offline
    noise = submit(eng, prompts_of([11, 4], seed=3), SamplingParams(max_new_tokens=15))
    sampled = submit(eng, [p] * 3, SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7))
    sampled.wait()
    noise.wait()
    assert [sampled.tokens(i) for i in range(3)] == [r.token_ids for r in offline]
    again = submit(eng, [p] * 3, SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7))
    again.wait()
    assert [again.tokens(i) for i in range(3)] == [r.token_ids for r in offline]


def test_speculative_decoding_in_the_running_batch(model, engine):
    eng = engine(speculative=True)
    greedy_p, sampled_p = prompts_of([5, 8], seed=4)
    greedy_ref = generate(model, [greedy_p], SamplingParams(max_new_tokens=14))[0]
    sampled_params = SamplingParams(max_new_tokens=14, temperature=0.9, seed=3)
    sampled_ref = generate(model, [sampled_p], sampled_params, speculative=True)[0]
    a = submit(eng, [greedy_p], SamplingParams(max_new_tokens=14))
    b = submit(eng, [sampled_p], SamplingParams(max_new_tokens=14, temperature=0.9, seed=3))
    a.wait()
    b.wait()
    assert a.tokens() == greedy_ref.token_ids  # speculative greedy = plain greedy, in a mixed batch
    assert b.tokens() == sampled_ref.token_ids  # seeded speculative sampling = offline, same seed
    assert eng.stats.steps < 2 * 14  # some drafts were accepted: fewer steps than tokens
    wait_until(lambda: eng.load()["running_rows"] == 0)
    assert eng.pool.free_blocks == eng.pool.capacity_blocks


def test_row_sampler_draws_as_one_row_samplers_would():
    """Rows with different parameters in one batch: each row's tokens and log-probs are those of a
    one-row `Sampler` with its parameters and seed; greedy rows take the argmax and draw nothing."""
    from nanoseek.inference.row_sampler import RowSampler
    from nanoseek.inference.sampling import Sampler

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0.7, seed=1), SamplingParams(), SamplingParams(temperature=1.3, top_p=0.8,
                                                                                          seed=2),
              SamplingParams(temperature=0.9, top_k=5, min_p=0.05, seed=3)]
    gens = [None if p.greedy else torch.Generator().manual_seed(p.seed) for p in params]
    rows = RowSampler(params, gens)
    singles = [Sampler(p, 1) for p in params]
    for _ in range(5):
        tokens, logprobs = rows(logits)
        for b, single in enumerate(singles):
            t, lp = single(logits[b:b + 1])
            assert int(tokens[b]) == int(t) and float(logprobs[b]) == pytest.approx(float(lp), abs=1e-6)
    assert int(rows(logits)[0][1]) == int(logits[1].argmax())
    one_hot = rows.probs(logits)[1]
    assert one_hot.sum() == 1 and one_hot[logits[1].argmax()] == 1


def test_stop_tokens_and_strings_end_a_row(model, engine):
    p = prompts_of([6], seed=5)[0]
    ref = generate(model, [p], SamplingParams(max_new_tokens=12))[0].token_ids
    eng = engine(eos_token_id=ref[4], decode=lambda ids: " ".join(map(str, ids)) + " ")
    sink = submit(eng, [p], SamplingParams(max_new_tokens=12))
    sink.wait()
    assert sink.tokens() == ref[:ref.index(ref[4]) + 1]
    assert sink.items[-2].finish_reason == "stop" and sink.items[-2].stop_reason == ref[4]
    stop = f" {ref[2]} "
    eng = engine(decode=lambda ids: " ".join(map(str, ids)) + " ")
    sink = submit(eng, [p], SamplingParams(max_new_tokens=12, stop_strings=(stop,)))
    sink.wait()
    assert sink.tokens() == ref[:3] and sink.items[-2].stop_reason == stop


def test_cancelled_requests_free_their_blocks(model, engine):
    eng = engine(max_batch=2)
    long = submit(eng, prompts_of([10]), SamplingParams(max_new_tokens=400))
    other = submit(eng, prompts_of([10], seed=1), SamplingParams(max_new_tokens=400))
    waiting = submit(eng, prompts_of([10], seed=2), SamplingParams(max_new_tokens=5))  # batch is full: it waits
    wait_until(lambda: len(long.items) >= 3)
    assert eng.load()["waiting_requests"] == 1
    held = eng.pool.capacity_blocks - eng.pool.free_blocks
    assert held > 0
    long.request.cancel()  # as the HTTP side does when a client goes away
    other.request.cancel()
    waiting.wait()  # the cancelled rows left, the waiting request got their place and finished
    assert isinstance(waiting.items[-1], RequestDone)
    wait_until(lambda: eng.load()["running_rows"] == 0)
    assert eng.pool.free_blocks == eng.pool.capacity_blocks
    assert not long.done.is_set() and not other.done.is_set()  # nothing more is sent to a cancelled request
    assert eng.stats.requests_cancelled == 2


def test_a_fault_in_one_request_fails_it_alone(model, engine, monkeypatch):
    marker = 499
    forward = model.forward

    def faulty(input_ids, *args, **kwargs):
        if (input_ids == marker).any():
            raise RuntimeError("poisoned row")
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", faulty)
    eng = engine()
    good = prompts_of([5, 9], seed=6)
    refs = [generate(model, [p], SamplingParams(max_new_tokens=6))[0].token_ids for p in good]
    eng.submit(Request([[3]], SamplingParams(max_new_tokens=1), Collector()))  # keeps the next three together
    sinks = [submit(eng, [p], SamplingParams(max_new_tokens=6)) for p in (good[0], [7, marker, 8], good[1])]
    for s in sinks:
        s.wait()
    assert isinstance(sinks[1].items[-1], RequestFailed) and "poisoned row" in sinks[1].items[-1].message
    assert [sinks[0].tokens(), sinks[2].tokens()] == refs
    after = submit(eng, [good[0]], SamplingParams(max_new_tokens=6))  # the loop still serves
    after.wait()
    assert after.tokens() == refs[0]
    wait_until(lambda: eng.load()["running_rows"] == 0)
    assert eng.pool.free_blocks == eng.pool.capacity_blocks


def test_bfloat16_model_serves_its_own_greedy_output(model, engine):
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    eng = EngineLoop(half, eos_token_id=None, decode=None, max_batch=4, queue=4, block_size=4)
    eng.start()
    try:
        assert eng.pool.kv.dtype == torch.bfloat16
        prompts = prompts_of([5, 9], seed=7)
        refs = [generate(half, [p], SamplingParams(max_new_tokens=8))[0].token_ids for p in prompts]
        sinks = [submit(eng, [p], SamplingParams(max_new_tokens=8)) for p in prompts]
        for s, ref in zip(sinks, refs):
            s.wait()
            assert s.tokens() == ref
    finally:
        eng.stop()


def test_prefill_batches_are_bounded(model):
    eng = EngineLoop(model, eos_token_id=None, decode=None, max_batch=8, queue=8, block_size=4,
                     max_prefill_tokens=20)
    sinks = [submit(eng, [p], SamplingParams(max_new_tokens=3)) for p in prompts_of([8, 7, 8, 30], seed=8)]
    eng.start()  # all four wait before the first iteration
    try:
        for s in sinks:
            assert isinstance(s.wait(), RequestDone)
        assert eng.stats.prefills == 3  # 2 x 8 <= 20; then 1 x 8 (2 x 30 > 20); the 30-token prompt alone
    finally:
        eng.stop()


def test_queue_is_bounded_and_impossible_requests_are_refused(model):
    eng = EngineLoop(model, eos_token_id=None, decode=None, max_batch=4, queue=2, cache_tokens=64, block_size=8)
    params = SamplingParams(max_new_tokens=4)
    for _ in range(2):
        eng.submit(Request([[5, 6]], params, Collector()))  # not started: they stay queued
    with pytest.raises(QueueFull):
        eng.submit(Request([[5, 6]], params, Collector()))
    with pytest.raises(PromptError, match="context"):
        eng.check([[5] * 512], params)
    with pytest.raises(PromptError, match="max-batch"):
        eng.check([[5]] * 5, params)
    with pytest.raises(PromptError, match="cache"):
        eng.check([[5] * 40], SamplingParams(max_new_tokens=40))
    with pytest.raises(PromptError, match="vocabulary"):
        eng.check([[5, 100_000]], params)


def test_stop_fails_open_requests_and_refuses_new_ones(model):
    eng = EngineLoop(model, eos_token_id=None, decode=None, max_batch=4, queue=4, block_size=8)
    eng.start()
    sink = submit(eng, prompts_of([8]), SamplingParams(max_new_tokens=500))
    wait_until(lambda: len(sink.items) >= 2)
    eng.stop()
    assert isinstance(sink.wait(), RequestFailed) and "shutting down" in sink.items[-1].message
    assert not eng._thread.is_alive()
    with pytest.raises(ShuttingDown):
        eng.submit(Request([[5]], SamplingParams(max_new_tokens=2), Collector()))
