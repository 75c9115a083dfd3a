"""`nanoseek r1`: the four R1 stages and distillation run end to end on a tiny model, each stage cached."""

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from nanoseek.config import preset
    from nanoseek.data import synthetic_corpus, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.hf import save_pretrained
    from nanoseek.model import DeepseekV3ForCausalLM

    root = tmp_path_factory.mktemp("r1pipe")
    corpus = write_corpus(synthetic_corpus(60, seed=0) + ["Q: 1+2\n<think>1+2=3.</think><answer>3</answer>"] * 5,
                          root / "c.jsonl")
    tok = train_tokenizer([corpus], 300, root / "tok", progress=False)
    torch.manual_seed(0)
    save_pretrained(DeepseekV3ForCausalLM(preset("tiny", vocab_size=320, max_position_embeddings=128)),
                    root / "model")
    tok.save(root / "model")
    return root / "model"


def test_r1_pipeline_runs_every_stage_and_caches(base_dir, tmp_path, monkeypatch, capsys):
    from nanoseek.cli import main
    from nanoseek.r1.pipeline import STAGES, readable

    monkeypatch.setenv("NANOSEEK_NO_PROGRESS", "1")
    args = ["r1", "--model", str(base_dir), "--task", "chain_sum", f"out_dir={tmp_path}",
            'task_options={"max_terms": 2, "hard_terms": 2, "max_value": 3}', "n_train=6", "n_test=3",
            "cold_start_examples=6", "cold_start_epochs=60", "sft_lr=5e-3", "rl_steps=2", "final_rl_steps=1",
            "group_size=2", "prompts_per_step=2", "k=2", "sft_epochs=60", "distill_epochs=1", "eval_k=1",
            "max_new_tokens=16"]
    assert main(args) == 0
    table = capsys.readouterr().out
    for name in ("base", "cold_start", "reasoning_rl", "sft", "final_rl", "distill"):
        assert name in table
    for stage in STAGES:
        assert (tmp_path / stage / "result.json").exists(), stage
    cold = [json.loads(x) for x in (tmp_path / "cold_start" / "traces.jsonl").read_text().splitlines()]
    assert cold[0]["completion"].count("=") >= 1 and all(readable(r["completion"]) for r in cold)
    models = json.loads((tmp_path / "eval" / "result.json").read_text())["models"]
    assert models["cold_start"]["format_rate"] > models["base"]["format_rate"]
    assert models["distill"]["params"] < models["final_rl"]["params"]
    student = json.loads((tmp_path / "distill" / "run" / "model" / "config.json").read_text())
    assert student["first_k_dense_replace"] == student["num_hidden_layers"]  # a dense student
    for stage in ("cold_start", "reasoning_rl", "sft", "final_rl", "distill"):  # work fixed in steps, all ran
        result = json.loads((tmp_path / stage / "result.json").read_text())
        assert result["steps"] == result["planned_steps"] > 0, stage
        assert result["cpu_seconds"] > 0 and result["load_average"] >= 0
    assert main(args) == 0 and capsys.readouterr().out.count("cached") == len(STAGES)


def test_readability_filter():
    from nanoseek.r1.pipeline import readable

    assert readable("1+2=3, 3+4=7.</think><answer>7</answer>")
    assert not readable("1+2=3, 1+2=3.</think><answer>3</answer>")  # a step repeated word for word
    assert not readable("1+2=3 因为</think><answer>3</answer>")  # mixed languages
    assert not readable("<answer>3</answer>")  # malformed


def test_cut_short_names_the_stages_that_ran_fewer_steps_than_planned():
    from nanoseek.r1.pipeline import cut_short

    results = {"cold_start": {"steps": 30, "planned_steps": 30}, "final_rl": {"steps": 9, "planned_steps": 50},
               "rejection": {"kept": 10}}
    assert cut_short(results) == ["the final_rl stage was cut short: 9 of 50 steps ran"]


def test_arithmetic_cold_start_traces_are_the_corpus_worked_form_readable_and_correct():
    from nanoseek.r1.pipeline import generated_trace, readable
    from nanoseek.r1.rewards import parse_completion
    from nanoseek.r1.rollout import build_task

    task = build_task("arithmetic", n_train=20, n_test=5, options={"n_operands": 2, "max_value": 99, "ops": "+"})
    for problem in task.train:
        trace = generated_trace("arithmetic", problem)
        assert trace.startswith(f"{problem.meta['compact']}={problem.answer}</think>") and readable(trace)
        assert task.verifier(parse_completion(trace, True).answer, problem)
    assert generated_trace("countdown", task.train[0]) is None  # no generator: rejection sampling instead
