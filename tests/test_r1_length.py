"""The length-growth experiment's pieces: the chain_sum task and its verifier, the corpus where longer
reasoning pays, phrase tracking in GRPO, and benchmarks/r1_length.py end to end (--quick)."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from nanoseek.errors import UserError
from nanoseek.r1.corpus import (
    chain_sum_example,
    direct_error_rate,
    has_self_check,
    length_corpus,
    running_sum_trace,
)
from nanoseek.r1.rewards import parse_completion
from nanoseek.r1.tasks import get_task


def test_chain_sum_splits_are_disjoint_and_the_test_split_is_hard():
    task = get_task("chain_sum", n_train=500, n_test=100, min_terms=2, max_terms=6, hard_terms=5)
    assert {len(p.meta["terms"]) for p in task.test} == {5, 6}
    assert {len(p.meta["terms"]) for p in task.train} == {2, 3, 4, 5, 6}
    assert not {p.meta["compact"] for p in task.train} & {p.meta["compact"] for p in task.test}
    p = task.test[0]
    assert p.answer == str(sum(p.meta["terms"])) and p.meta["compact"] == "+".join(map(str, p.meta["terms"]))
    assert task.verify(p.answer, p) and not task.verify(str(int(p.answer) + 1), p)
    assert not task.verify(p.meta["compact"], p)  # the question itself is not the answer
    # the test split does not depend on n_train; test_split=all draws it like training
    assert get_task("chain_sum", n_train=50, n_test=100).test == get_task("chain_sum", n_train=500, n_test=100).test
    easy = get_task("chain_sum", n_train=10, n_test=200, test_split="all")
    assert min(len(p.meta["terms"]) for p in easy.test) == 2
    with pytest.raises(UserError, match="chain_sum needs"):
        get_task("chain_sum", min_terms=4, max_terms=3)
    with pytest.raises(UserError, match="has no option"):
        get_task("chain_sum", ops="+")


def test_running_sum_trace_and_self_check():
    assert running_sum_trace([3, 5, 8], check=False) == "3+5=8, 8+8=16."
    assert running_sum_trace([3, 5, 8], check=True) == "3+5=8, 8+8=16. check: 16-8=8."
    assert has_self_check("3+5=8. check: 8-5=3.") and not has_self_check("3+5=8.") and not has_self_check(None)


def test_length_corpus_mixes_reliable_steps_with_unreliable_one_go_answers():
    task = get_task("chain_sum", n_train=400, n_test=50)
    rng = random.Random(0)
    stats = Counter()
    for _ in range(3000):
        problem = rng.choice(task.train)
        text = chain_sum_example(problem, rng, p_steps=0.3, p_check=0.3)
        parsed = parse_completion(text.split("\n", 1)[1], prompt_opened_think=None)
        assert parsed.well_formed  # every worked example is in the R1 format
        steps = parsed.think.count("=") > 1
        kind = ("steps" if steps else "direct", len(problem.meta["terms"]) >= 5)
        stats[kind] += 1
        stats[kind + ("right",)] += parsed.answer == problem.answer
        stats["check"] += has_self_check(parsed.think)
    share_steps = (stats[("steps", False)] + stats[("steps", True)]) / 3000
    assert 0.25 < share_steps < 0.35 and 0.2 < stats["check"] / (share_steps * 3000) < 0.4
    assert stats[("steps", True, "right")] == stats[("steps", True)]  # worked traces are always right
    hard_direct = stats[("direct", True, "right")] / stats[("direct", True)]
    assert 0.4 < hard_direct < 0.6  # one-go answers to long chains: about half wrong
    assert direct_error_rate(2) == 0 and direct_error_rate(6) == 0.6
    # no test problem appears in the corpus
    docs = length_corpus(task, 500, 50, seed=0)
    assert len(docs) > 500 and not any(f"Q: {p.meta['compact']}\n" in d for p in task.test for d in docs)


def test_grpo_tracks_a_phrase(tmp_path, monkeypatch, one_thread):
    from nanoseek.r1.grpo_batches import rollout_stats
    from nanoseek.r1.rollout import SampledTokens, score_completion

    task = get_task("chain_sum", n_train=4, n_test=2)
    p = task.train[0]
    texts = [f"x check: 1</think><answer>{p.answer}</answer>", "no</think><answer>0</answer>"]
    group = [score_completion(task, p, "Q: x\n<think>", t, SampledTokens([1, 2], [-1.0, -1.0], "stop"))
             for t in texts]
    stats = rollout_stats([group], 1.0, "check:")
    assert stats["phrase_share"] == 0.5 and stats["zero_var_groups"] == 0.0
    assert "phrase_share" not in rollout_stats([group], 1.0)


def test_r1_length_benchmark_quick(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("NANOSEEK_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "r1_length.py"
    spec = importlib.util.spec_from_file_location("r1_length", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        summary = module.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    seed = summary["seeds"][0]
    assert seed["grpo"]["steps"] == 3 and not seed["grpo"]["cut_short"]
    for key in ("greedy_accuracy", "greedy_length", "sample_steps_share", "sample_check_share"):
        assert key in seed["before"] and key in seed["after"]
    rows = [json.loads(x) for x in (tmp_path / "seed_0" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert "phrase_share" in rows[0] and "test_response_length" in rows[1]
    assert (tmp_path / "r1_length.png").stat().st_size > 0
    assert "| greedy accuracy | 0 |" in (tmp_path / "results.md").read_text()
    (tmp_path / "results.md").unlink()
    again = module.main(["--quick", "--out", str(tmp_path), "--report-only"])  # no training, same numbers
    assert again["seeds"] == summary["seeds"] and (tmp_path / "results.md").exists()
