"""The paged latent cache (nanoseek.serve.paged_cache): the model's forward over block tables gives the
logits of the slot-aligned LatentKVCache, rows can join and leave between steps, blocks follow live
tokens and go back to the pool, and an uncommitted step changes nothing."""

import pytest
import torch

import nanoseek
from nanoseek.config import preset
from nanoseek.inference import LatentKVCache, SamplingParams, generate
from nanoseek.inference.requests import pad_left
from nanoseek.serve.paged_cache import BlockPool, CacheFull, PagedLatentCache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nanoseek.DeepseekV3ForCausalLM(preset("tiny")).eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def test_paged_forward_matches_the_slot_cache(model):
    prompts = prompts_of([5, 11, 2])
    dense = LatentKVCache.for_model(model, 3, 40)
    paged = PagedLatentCache(BlockPool.for_model(model, tokens=64, block_size=4, initial_tokens=4))
    for sid in range(3):
        paged.add(sid)
        paged.reserve(sid, len(prompts[sid]))
    ids, valid = pad_left(prompts, 0)
    want = model(ids, attention_mask=valid, cache=dense, logits_to_keep=1).logits[:, -1]
    view = paged.view([0, 1, 2])
    got = model(ids, attention_mask=valid, cache=view, logits_to_keep=1).logits[:, -1]
    view.commit()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for _ in range(6):  # decode steps: the blocks grow one token at a time, across block boundaries
        tokens = want.argmax(-1)
        for sid in range(3):
            paged.reserve(sid, paged.length(sid) + 1)
        want = model(tokens[:, None], cache=dense).logits[:, -1]
        view = paged.view([0, 1, 2])
        got = model(tokens[:, None], cache=view).logits[:, -1]
        view.commit()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [paged.length(s) for s in range(3)] == [len(p) + 6 for p in prompts]
    assert [len(paged.seqs[s].blocks) for s in range(3)] == [3, 5, 2]  # ceil(length / 4)
    assert 2 < paged.pool.allocated_blocks < paged.pool.num_blocks  # grew from 2 blocks as tokens came, not to the max


@torch.inference_mode()
def test_rows_join_and_leave_between_steps(model):
    """Greedy decoding where sequences start at different steps and one leaves early gives each
    sequence the tokens of generating it alone."""
    prompts = prompts_of([4, 9, 6], seed=1)
    steps = [8, 3, 8]
    joins = [0, 1, 3]  # the step at which each sequence is prefilled
    alone = [generate(model, [p], SamplingParams(max_new_tokens=n), eos_token_id=[])[0].token_ids
             for p, n in zip(prompts, steps)]
    pool = BlockPool.for_model(model, tokens=48, block_size=2, initial_tokens=2)
    cache = PagedLatentCache(pool)
    out = {i: [] for i in range(3)}
    for t in range(12):
        for i in [i for i in range(3) if joins[i] == t]:
            cache.add(i)
            cache.reserve(i, len(prompts[i]))
            view = cache.view([i])
            out[i].append(int(model(torch.tensor([prompts[i]]), cache=view).logits[0, -1].argmax()))
            view.commit()
        live = [i for i in range(3) if i in cache.seqs and len(out[i]) < steps[i]]
        for i in [i for i in list(cache.seqs) if len(out[i]) >= steps[i]]:
            cache.release(i)
        if not live:
            continue
        for i in live:
            cache.reserve(i, cache.length(i) + 1)
        view = cache.view(live)
        logits = model(torch.tensor([[out[i][-1]] for i in live]), cache=view).logits[:, -1]
        view.commit()
        for i, token in zip(live, logits.argmax(-1).tolist()):
            out[i].append(token)
    assert [out[i] for i in range(3)] == alone
    for i in list(cache.seqs):
        cache.release(i)
    assert pool.free_blocks == pool.capacity_blocks and cache.blocks_held() == 0


def test_blocks_follow_live_tokens_and_run_out_cleanly(model):
    pool = BlockPool.for_model(model, tokens=10, block_size=4, initial_tokens=4)  # 3 blocks, storage for 1
    assert pool.allocated_blocks == 2 and pool.free_blocks == 3
    cache = PagedLatentCache(pool)
    cache.add(0)
    cache.reserve(0, 5)
    assert pool.free_blocks == 1 and len(cache.seqs[0].blocks) == 2 and pool.allocated_blocks == 4  # doubled
    cache.add(1)
    with pytest.raises(CacheFull):
        cache.reserve(1, 9)
    cache.reserve(1, 4)
    assert pool.free_blocks == 0
    cache.release(0)
    assert pool.free_blocks == 2 and pool.allocated_blocks == 4  # the storage stays for the next peak
    with pytest.raises(ValueError):
        cache.add(1)


@torch.inference_mode()
def test_an_uncommitted_step_changes_nothing(model):
    cache = PagedLatentCache(BlockPool.for_model(model, tokens=32, block_size=4))
    cache.add(0)
    cache.reserve(0, 8)
    view = cache.view([0])
    model(torch.tensor([[5, 6, 7]]), cache=view)
    view.commit()
    ref = cache.view([0])
    want = model(torch.tensor([[9]]), cache=ref).logits
    failed = cache.view([0])
    model(torch.tensor([[11, 12]]), cache=failed)  # never committed (a step that failed halfway)
    assert cache.length(0) == 3
    again = cache.view([0])
    torch.testing.assert_close(model(torch.tensor([[9]]), cache=again).logits, want)
    with pytest.raises(CacheFull):  # a step beyond the reserved blocks is refused before any work
        model(torch.tensor([list(range(3, 9))]), cache=cache.view([0]))
