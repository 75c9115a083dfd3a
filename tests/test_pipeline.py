"""Pipeline parallelism (nanoseek.parallel.pipeline): every schedule's step equals one process, alone and with EP
inside the stages; `nanoseek pretrain` with stages matches one process, checkpoints, resumes exactly and exports
a model that loads in transformers; bad pipeline layouts are one error before any process group.

Multi-process checks: CPU processes with gloo, one thread each, hard deadline (tests/parallel_launch.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.config import preset
from nanoseek.errors import SettingError
from nanoseek.parallel.config import ParallelConfig
from nanoseek.parallel.pipeline import split_layers, stage_ranks
from parallel_launch import launch

TINY5 = preset("tiny").replace(num_hidden_layers=5)


# ---------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("settings_, world, message", [
    (dict(pp=4, schedule="zbv"), 4, r"`parallel.pp` = 4: must be at most 2: zbv cuts the model into 2 x pp stages, "
                                    r"and each needs at least one of the 5 blocks"),
    (dict(pp=6), 6, r"`parallel.pp` = 6: must be at most 5"),
    (dict(pp=2, schedule="dualpipev", microbatches=2), 2,
     r"`parallel.microbatches` = 2: must be >= 4: dualpipev with pp=2 needs at least one micro-batch per stage"),
    (dict(pp=4, microbatches=3), 4, r"`parallel.microbatches` = 3: must be >= 4: 1f1b with pp=4 needs at least one "
                                    r"micro-batch per pipeline rank"),
    (dict(pp=2, schedule="interleaved_1f1b", microbatches=5), 2, r"a multiple of pp=2 for interleaved_1f1b"),
    (dict(pp=2, schedule="gpipe"), 2, r"`parallel.schedule` = 'gpipe': must be 1f1b, interleaved_1f1b, zbv, dualpipev"),
    (dict(schedule="zbv"), 1, r"apply to pipeline stages only: set parallel.pp > 1"),
    (dict(microbatches=4, ep=2), 2, r"apply to pipeline stages only"),
    (dict(pp=2, schedule="dualpipev", ep=2), 4, None),
])
def test_bad_pipeline_layouts_are_one_error(settings_, world, message):
    cfg = ParallelConfig(**settings_)
    if message is None:
        cfg.validate(TINY5, world)
        return
    with pytest.raises(SettingError, match=message):
        cfg.validate(TINY5, world)


def test_tied_embeddings_and_batches_that_do_not_split():
    with pytest.raises(SettingError, match="tie_word_embeddings"):
        ParallelConfig(pp=2).validate(TINY5.replace(tie_word_embeddings=True), 2)
    cfg = ParallelConfig(pp=2, schedule="zbv", ep=2)  # 2 data-parallel ranks x 4 micro-batches
    cfg.validate_batch(8)
    with pytest.raises(SettingError, match=r"`batch_size` = 12: must be a multiple of data-parallel ranks x "
                                           r"micro-batches = 2 x 4"):
        cfg.validate_batch(12)


def test_pretrain_refuses_before_any_process_group(monkeypatch, tmp_path):
    from nanoseek.train.config import PretrainConfig, load_train_config
    from nanoseek.train.pretrain import run_pretraining

    monkeypatch.setenv("WORLD_SIZE", "2")

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was asked for before the settings were checked")

    monkeypatch.setattr("nanoseek.parallel.runtime.init_parallel", no_process_group)
    cfg = load_train_config(PretrainConfig, None, ["model=tiny", "model.num_hidden_layers=4", "parallel.pp=2",
                                                   "parallel.schedule=dualpipev", "batch_size=6",
                                                   f"out_dir={tmp_path}"])
    with pytest.raises(SettingError, match=r"`batch_size` = 6: must be a multiple of data-parallel ranks x "
                                           r"micro-batches = 1 x 4"):
        run_pretraining(cfg)


def test_stages_split_blocks_and_sit_in_a_loop_or_a_v():
    assert [list(r) for r in split_layers(5, 4)] == [[0, 1], [2], [3], [4]]
    assert [list(r) for r in split_layers(4, 2)] == [[0, 1], [2, 3]]
    assert stage_ranks(ParallelConfig(pp=2, schedule="interleaved_1f1b")) == {0: 0, 1: 1, 2: 0, 3: 1}
    assert stage_ranks(ParallelConfig(pp=2, schedule="dualpipev")) == {0: 0, 1: 1, 2: 1, 3: 0}  # first + last on 0
    assert stage_ranks(ParallelConfig(pp=3, schedule="zbv")) == {0: 0, 1: 1, 2: 2, 3: 2, 4: 1, 5: 0}


# ---------------------------------------------------------------------------------------------- one step
SCHEDULES = ["1f1b", "interleaved_1f1b", "zbv", "dualpipev"]
TWO = [f"pp=2,schedule={s}" for s in SCHEDULES]
FOUR = [f"pp=2,ep=2,schedule={s}" for s in SCHEDULES] + ["pp=2,ep=2,overlap=1,schedule=1f1b"]  # overlap: parallel.overlap


def run_specs(tmp_path_factory, nprocs, specs, timeout):
    out = tmp_path_factory.mktemp(f"pipeline{nprocs}")
    for rc, log in launch(["tests/parallel_worker.py", str(out), *specs], nprocs, timeout=timeout):
        assert rc == 0, log[-3000:]
    return {spec: json.loads((out / f"{spec}.json").read_text()) for spec in specs}


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    return run_specs(tmp_path_factory, 2, TWO, timeout=150)


@pytest.fixture(scope="module")
def four_procs(tmp_path_factory):
    return run_specs(tmp_path_factory, 4, FOUR, timeout=150)


def check_step(r: dict) -> None:
    """Loss (and its LM / MTP / balance parts), every gradient and the norm within 1e-5 of one process; every
    parameter held by some stage; the same aux-free bias; the MTP embedding mirror equal to the embedding."""
    assert r["loss_diff"] <= 1e-5 and r["grad_diff"] <= 1e-5 and r["norm_diff"] <= 1e-5, r
    assert r["params_covered"] and not r["no_grad"], r
    assert r["bias_equal"] and r["mirror_ok"], r


@pytest.mark.parametrize("spec", TWO)
def test_memory_held_per_stage_is_what_the_schedule_plans(two_procs, spec):
    """Rank 0's stages: the micro-batches held at once, measured around torch's stage calls, equal the
    schedule's plan; 1F1B's first stage holds pp of them, DualPipeV's rank PP + 1 (PP = stages); the
    activations saved per micro-batch and the parameters are counted."""
    m = two_procs[spec]["memory"]
    assert m["in_flight"] == m["in_flight_planned"] > 0, m
    for stage in m["stages"]:
        assert stage["in_flight"] == stage["in_flight_planned"] > 0, stage
        assert stage["activation_bytes_per_microbatch"] > 0 and stage["params"] == stage["params_local"] > 0
    if spec.endswith("=1f1b"):
        assert m["stages"][0]["in_flight"] == 2  # pp
    if spec.endswith("=dualpipev"):
        assert m["in_flight"] == 4 + 1 and m["stages"][1]["mirror_params"] == 64 * 64  # stages + 1; vocab x hidden


@pytest.mark.parametrize("spec", TWO)
def test_pipeline_step_equals_one_process(two_procs, spec):
    r = two_procs[spec]
    check_step(r)
    # 5 blocks, uneven: 3 + 2 over two stages, 2 + 1 + 1 + 1 over four (rank 0 shows its own)
    assert r["layers"] == ({"0": [0, 1, 2]} if "1f1b" == spec.split("=")[-1] else
                           {"0": [0, 1], "2": [3]} if "interleaved" in spec else {"0": [0, 1], "3": [4]})


@pytest.mark.parametrize("spec", FOUR)
def test_pipeline_with_expert_parallel_step_equals_one_process(four_procs, spec):
    check_step(four_procs[spec])


# ---------------------------------------------------------------------------------------------- pretraining
STEPS = 6
SETTINGS = ["model=tiny", "model.vocab_size=320", "model.num_hidden_layers=4", "seq_len=32", "batch_size=8",
            f"max_steps={STEPS}", "lr=3e-3", "warmup_steps=2", "eval_every=3", "eval_batches=1", "save_every=3",
            "sample_prompt=", "tensorboard=false", "bias_gamma=0.01", "parallel.timeout_s=30"]
PIPELINE = ["parallel.pp=2", "parallel.schedule=1f1b"]  # first and last stage on two ranks: the mirror crosses


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pipelined(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp_run")
    results = launch(["-m", "nanoseek", "pretrain", *SETTINGS, *PIPELINE, f"data={data_dir}", f"out_dir={out}"], 2,
                     timeout=120)
    for rc, log in results:
        assert rc == 0, log[-3000:]
    return out


def test_pipelined_pretraining_matches_one_process(data_dir, pipelined, tmp_path, one_thread):
    from nanoseek.train.config import PretrainConfig, load_train_config
    from nanoseek.train.pretrain import run_pretraining

    single = tmp_path / "single"
    run_pretraining(load_train_config(PretrainConfig, None, [*SETTINGS, f"data={data_dir}", f"out_dir={single}"]))
    a, b = rows(single), rows(pipelined)
    assert len(a) == len(b) == STEPS
    for x, y in zip(a, b):
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "val_loss", "grad_norm", "load_max_mean"):
            assert (key in x) == (key in y), key
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(x[key])), (key, x[key], y[key])
        assert x["load/layer2"] == pytest.approx(y["load/layer2"], abs=1e-9)  # a MoE layer of the last stage
    wa, wb = load_file(single / "model" / "model.safetensors"), load_file(pipelined / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_pipelined_checkpoint_resumes_exactly_and_exports(data_dir, pipelined, tmp_path):
    from transformers import AutoModelForCausalLM

    import nanoseek

    ckpt = pipelined / "checkpoints" / "step_00000003"
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    out = tmp_path / "resumed"  # the run as it stood after step 3
    shutil.copytree(pipelined, out)
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    results = launch(["-m", "nanoseek", "pretrain", *SETTINGS, *PIPELINE, f"data={data_dir}", f"out_dir={out}",
                      "--resume"], 2, timeout=120)
    for rc, log in results:
        assert rc == 0, log[-3000:]
    assert "resumed from" in results[0][1] and "(step 3)" in results[0][1]
    a, b = load_file(pipelined / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(pipelined)]
    model = nanoseek.from_pretrained(out / "model")
    hf = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-4)
