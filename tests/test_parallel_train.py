"""`nanoseek pretrain` on several processes: torchrun launch, the same losses as one process, sharded
checkpoints that resume exactly at the same layout and at another one (4 -> 2 ranks), a killed rank that
stops the job with an error (no hang), and the final model exported from the shards.

Every launch runs CPU processes with gloo and one thread each under a hard deadline (tests/parallel_launch.py)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.train.checkpoint import latest_checkpoint, list_checkpoints
from nanoseek.train.config import PretrainConfig, load_train_config
from nanoseek.train.pretrain import run_pretraining
from parallel_launch import launch, torchrun

STEPS = 20
SETTINGS = ["model=tiny", "model.vocab_size=320", "seq_len=32", "batch_size=4", f"max_steps={STEPS}", "lr=3e-3",
            "warmup_steps=2", "eval_every=10", "eval_batches=1", "save_every=4", "sample_prompt=",
            "tensorboard=false", "bias_gamma=0.01", "parallel.timeout_s=30"]


def args(data_dir, out, *extra) -> list[str]:
    return ["-m", "nanoseek", "pretrain", *SETTINGS, f"data={data_dir}", f"out_dir={out}", *extra]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def ok(results) -> None:
    for rc, log in results:
        assert rc == 0, log[-3000:]


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    cfg = load_train_config(PretrainConfig, None, [*SETTINGS, f"data={data_dir}", f"out_dir={out}"])
    torch.set_num_threads(1)
    run_pretraining(cfg)
    return out


@pytest.fixture(scope="module")
def torchrun_fsdp(data_dir, tmp_path_factory):
    """`torchrun --nproc-per-node 2 -m nanoseek pretrain ... parallel.dp_shard=2`, uninterrupted."""
    out = tmp_path_factory.mktemp("torchrun")
    log = torchrun(args(data_dir, out, "parallel.dp_shard=2"), 2)
    assert log.count(f"done: step {STEPS}") == 1  # the summary comes from rank 0 only
    return out


def test_torchrun_fsdp_matches_one_process(one_process, torchrun_fsdp):
    single, sharded = losses(one_process), losses(torchrun_fsdp)
    assert len(single) == len(sharded) == STEPS
    for a, b in zip(single, sharded):
        assert abs(a - b) <= 1e-4 * abs(a), (single, sharded)
    ckpt = latest_checkpoint(torchrun_fsdp / "checkpoints")
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2


def test_export_from_shards_loads_everywhere(one_process, torchrun_fsdp):
    import nanoseek
    from transformers import AutoModelForCausalLM

    a, b = weights(one_process), weights(torchrun_fsdp)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    model = nanoseek.from_pretrained(torchrun_fsdp / "model")
    hf = AutoModelForCausalLM.from_pretrained(torchrun_fsdp / "model")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-4)


def test_killed_rank_stops_the_job_and_resume_is_exact(data_dir, tmp_path, torchrun_fsdp):
    out = tmp_path / "run"
    crashed = launch(args(data_dir, out, "parallel.dp_shard=2"), 2, timeout=90, kill_rank=1,
                     kill_when=out / "checkpoints" / "step_00000008")
    assert crashed[1][0] == -signal.SIGKILL
    rc, log = crashed[0]
    assert rc == 2 and "error: rank 0: lost contact with another rank at step" in log and "Traceback" not in log, log[-2000:]
    assert latest_checkpoint(out / "checkpoints") is not None
    resumed = launch([*args(data_dir, out, "parallel.dp_shard=2"), "--resume"], 2, timeout=90)
    ok(resumed)
    a, b = weights(torchrun_fsdp), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: the same as never interrupted


def test_hung_rank_times_out(data_dir, tmp_path):
    """A rank that stops answering (SIGSTOP) makes the others fail after parallel.timeout_s, not hang."""
    out = tmp_path / "run"
    results = launch(args(data_dir, out, "parallel.dp_shard=2", "parallel.timeout_s=3"), 2, timeout=60,
                     kill_rank=1, kill_when=out / "checkpoints" / "step_00000004", kill_signal=signal.SIGSTOP)
    rc, log = results[0]
    assert rc == 2 and "lost contact with another rank" in log and "Timed out" in log, log[-2000:]
    assert results[1][0] is None  # still stopped when rank 0 gave up


def test_reshard_resume_four_ranks_ep4_to_two_ranks_ep2(data_dir, tmp_path, one_process):
    out = tmp_path / "run"
    crashed = launch(args(data_dir, out, "parallel.ep=4", "parallel.nodes=2"), 4, timeout=120, kill_rank=3,
                     kill_when=out / "checkpoints" / "step_00000004")
    assert crashed[0][0] == 2
    saved = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert "step_00000004" in saved
    ok(launch([*args(data_dir, out, "parallel.ep=2", "parallel.nodes=2"), "--resume"], 2, timeout=90))
    single, resharded = losses(one_process), losses(out)
    assert len(resharded) == STEPS
    for a, b in zip(single, resharded):
        assert abs(a - b) <= 1e-5 * abs(a), (single, resharded)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["a2a_max_nodes_per_token"] <= 1  # tiny: topk_group = 1 of n_group = 2 nodes
    assert rows[-1]["a2a_cross_node_bytes"] > 0


def test_single_process_resumes_a_sharded_checkpoint(data_dir, torchrun_fsdp, tmp_path):
    """One process is the same code path on a 1-rank mesh, so it resumes a 2-rank FSDP checkpoint (DCP
    reshards it) and continues like the uninterrupted 2-rank run."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(torchrun_fsdp, out)
    for late in [p for p in list_checkpoints(out / "checkpoints") if p.name > "step_00000016"]:
        shutil.rmtree(late)
    shutil.rmtree(out / "model")
    cfg = load_train_config(PretrainConfig, None, [*SETTINGS, f"data={data_dir}", f"out_dir={out}"])
    torch.set_num_threads(1)
    resumed = run_pretraining(cfg, resume=True)
    assert [r["step"] for r in resumed.history] == list(range(17, STEPS + 1))
    tail = losses(torchrun_fsdp)[16:]
    assert [r["loss"] for r in resumed.history] == pytest.approx(tail, rel=1e-5)


def test_resume_with_weights_that_never_had_a_gradient(data_dir, tmp_path):
    """With the MTP loss weight at 0 the MTP module gets no gradient, so AdamW holds no state for it; the
    sharded checkpoint must still load (torch creates state for every parameter before a load) and the
    resumed run must equal the uninterrupted one bitwise."""
    import shutil

    out = tmp_path / "run"
    run = args(data_dir, out, "mtp_lambda=0", "mtp_lambda_final=0", "max_steps=4", "save_every=2",
               "eval_every=0")
    ok(launch(run, 1, timeout=90))  # one process launched like torchrun: the sharded code path
    uninterrupted = weights(out)
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    shutil.rmtree(out / "model")
    ok(launch([*run, "--resume"], 1, timeout=90))
    resumed = weights(out)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
