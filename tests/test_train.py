"""Pretraining system: exact resume, checkpoint safety, config handling, bad input."""

import dataclasses
import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from nanoseek.errors import SettingError, UserError
from nanoseek.train.checkpoint import latest_checkpoint, list_checkpoints
from nanoseek.train.config import PretrainConfig, load_train_config
from nanoseek.train.metrics_log import read_metrics
from nanoseek.train.pretrain import run_pretraining


def config(data_dir, out, **kw):
    base = dict(model="tiny", model_overrides={"vocab_size": 320}, data=str(data_dir), out_dir=str(out),
                seq_len=32, batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=1,
                save_every=3, sample_prompt="", tensorboard=False, bias_gamma=0.01)
    base.update(kw)
    return PretrainConfig(**base)


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


def test_resume_is_bitwise_exact(data_dir, tmp_path):
    straight = run_pretraining(config(data_dir, tmp_path / "a", max_steps=6))
    run_pretraining(config(data_dir, tmp_path / "b", max_steps=3))  # "crash" after 3 steps
    resumed = run_pretraining(config(data_dir, tmp_path / "b", max_steps=6), resume=True)
    assert resumed.history[0]["step"] == 4  # really continued, did not start over
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    bias = [k for k in a if k.endswith("e_score_correction_bias")]
    assert bias and any(a[k].abs().sum() > 0 for k in bias)  # the balancing bias moved and was resumed too
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "load_max_mean", "dead_experts", "grad_norm", "lr",
                "tokens_per_s", "mfu"):
        assert key in rows[-1], key
    assert "val_loss" in rows[2]
    assert straight.history[-1]["loss"] < straight.history[0]["loss"] + 1.0


def test_corrupt_checkpoint_is_skipped(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=6))
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000006"]
    with open(ckpts[-1] / "dcp" / "__0_0.distcp", "r+b") as f:  # flip bytes in the newest's weights
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    capsys.readouterr()
    assert latest_checkpoint(out / "checkpoints") == ckpts[0]
    err = capsys.readouterr().err  # one nanoseek warning line, not a Python UserWarning quoting source
    assert re.fullmatch(r"nanoseek: warning: skipping corrupt checkpoint \S*step_00000006: "
                        r"dcp/__0_0.distcp does not match its checksum\n", err)


def test_full_disk_keeps_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=3))
    import nanoseek.parallel.dcp as dcp

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "fsync_file", no_space)  # the last writes of a checkpoint (rank 0, after the shards)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoints are intact"):
        run_pretraining(config(data_dir, out, max_steps=6), resume=True)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003"]
    assert latest_checkpoint(out / "checkpoints") is not None
    assert not any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir())


def test_bad_inputs_give_clear_errors(data_dir, tmp_path):
    with pytest.raises(UserError, match="tokenizer has 300 tokens but the model's vocab_size is 128"):
        run_pretraining(config(data_dir, tmp_path, model_overrides={"vocab_size": 128}))
    with pytest.raises(SettingError, match=r"`seq_len` = 1024: must be <= the model's max_position_embeddings \(512\)"):
        run_pretraining(config(data_dir, tmp_path, seq_len=1024))
    with pytest.raises(UserError, match="nowhere does not exist"):
        run_pretraining(config(tmp_path / "nowhere", tmp_path))


def test_toml_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "tiny"\nmax_steps = 7\nschedule = "wsd"\n[model_overrides]\nn_routed_experts = 16\n')
    cfg = load_train_config(PretrainConfig, str(toml), ["lr=0.01", "model.n_group=4", "compile=true"])
    assert (cfg.max_steps, cfg.schedule, cfg.lr, cfg.compile) == (7, "wsd", 0.01, True)
    assert cfg.model_config().n_routed_experts == 16 and cfg.model_config().n_group == 4
    with pytest.raises(UserError, match="unknown setting 'nope'"):
        load_train_config(PretrainConfig, str(toml), ["nope=1"])
    with pytest.raises(UserError, match="expected"):
        load_train_config(PretrainConfig, None, ["max_steps=ten"])
    with pytest.raises(UserError, match="`schedule`"):
        load_train_config(PretrainConfig, None, ["schedule=linear"])


def test_yarn_stage_switches_rope():
    cfg = PretrainConfig(model="tiny", yarn_factor=4, yarn_original_len=128, seq_len=512)
    m = cfg.model_config()
    assert m.rope_type == "yarn" and m.rope_scaling["factor"] == 4
    assert m.rope_scaling["original_max_position_embeddings"] == 128 and m.max_position_embeddings >= 512


def test_resume_truncates_the_metrics_log(data_dir, tmp_path):
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=5, save_every=3))  # checkpoints at 3 and 5
    shutil.rmtree(out / "checkpoints" / "step_00000005")  # as if killed after logging step 5 but before saving it
    resumed = run_pretraining(config(data_dir, out, max_steps=6, save_every=3), resume=True)
    assert resumed.history[0]["step"] == 4
    steps = [row["step"] for row in read_metrics(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 4 and 5 were redone: logged once


def test_resume_without_checkpoint_says_so(data_dir, tmp_path, capsys):
    run_pretraining(config(data_dir, tmp_path / "new", max_steps=2), resume=True)
    assert "nanoseek: warning: no checkpoint to resume in" in capsys.readouterr().err


def test_refused_run_changes_nothing(data_dir, tmp_path):
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=3))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds checkpoints of another run"):
        run_pretraining(config(data_dir, out, max_steps=4, lr=1e-3))  # no --resume
    with pytest.raises(UserError, match="cannot resume the data loader: seq_len"):
        run_pretraining(config(data_dir, out, max_steps=6, seq_len=16), resume=True)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # train_config.json and metrics.jsonl included


def test_resume_with_only_corrupt_checkpoints_is_an_error(data_dir, tmp_path):
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=3))
    (out / "checkpoints" / "step_00000003" / "checksums.json").write_text("{broken")
    with pytest.raises(UserError, match="none of the 1 checkpoints .* is valid") as e:
        run_pretraining(config(data_dir, out, max_steps=6), resume=True)
    assert "--resume)" not in str(e.value)  # it does not tell a user who gave --resume to give it


def test_data_without_tokenizer_warns(data_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(data_dir, bare)
    shutil.rmtree(bare / "tokenizer")  # shards prepared elsewhere, copied without their tokenizer
    run_pretraining(config(bare, tmp_path / "run", max_steps=1))
    assert "the exported model will have no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model" / "tokenizer.json").exists()


def test_history_is_bounded(data_dir, tmp_path, monkeypatch):
    import nanoseek.train.core as core

    monkeypatch.setattr(core, "HISTORY_ROWS", 4)
    trainer = run_pretraining(config(data_dir, tmp_path / "run", max_steps=6))
    assert [h["step"] for h in trainer.history] == [3, 4, 5, 6]
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 6  # the log keeps everything


@pytest.mark.parametrize("override, setting", [
    ("eval_batches=0", "eval_batches"), ("log_every=0", "log_every"), ("beta1=1.5", "beta1"),
    ("beta2=-0.1", "beta2"), ("save_every=-1", "save_every"), ("lr=inf", "lr"), ("lr=nan", "lr"),
    ("lr=0", "lr"), ("max_steps=0", "max_steps"), ("keep_last=0", "keep_last"), ("grad_clip=-1", "grad_clip"),
    ("weight_decay=nan", "weight_decay"), ("min_lr_ratio=2", "min_lr_ratio"), ("seq_len=1", "seq_len"),
    ("batch_size=0", "batch_size"), ("grad_accum=0", "grad_accum"), ("device=tpu", "device"),
    ("nonfinite=ignore", "nonfinite"), ("nonfinite_patience=0", "nonfinite_patience"), ("seed=-1", "seed"),
    ("mtp_lambda=-1", "mtp_lambda"), ("yarn_factor=inf", "yarn_factor"), ("peak_tflops=-5", "peak_tflops"),
    ("schedule=linear", "schedule"), ("dtype=fp8", "dtype"), ("balance=off", "balance"),
])
def test_every_setting_is_validated(override, setting):
    with pytest.raises(SettingError, match=rf"^invalid setting `{setting}` = .*: must be "):
        load_train_config(PretrainConfig, None, [override])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_setting_error():
    with pytest.raises(SettingError, match="`device` = 'cuda', but CUDA is not available"):
        load_train_config(PretrainConfig, None, ["device=cuda"])


@pytest.mark.parametrize("line, message", [
    ('seq_len = "sixty-four"', "`seq_len` = 'sixty-four': expected an integer"),
    ("batch_size = 2.5", "`batch_size` = 2.5: expected an integer"),
    ('compile = "false"', "`compile` = 'false': expected true or false"),
    ("lr = true", "`lr` = True: expected a number"),
    ("data = 3", "`data` = 3: expected a string"),
    ("model_overrides = 3", "`model_overrides` = 3: expected a table"),
    ("nope = 1", "unknown setting 'nope'"),
    ("task = 'arithmetic'", "unknown setting 'task' \\(not a Pretrain setting\\)"),
])
def test_toml_values_are_type_checked(tmp_path, line, message):
    toml = tmp_path / "run.toml"
    toml.write_text(line + "\n")
    with pytest.raises(UserError, match=message):
        load_train_config(PretrainConfig, str(toml), [])


def test_toml_ints_are_accepted_for_floats(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("lr = 1\ncompile = false\n")
    cfg = load_train_config(PretrainConfig, str(toml), [])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.compile is False


def test_model_fields_owned_by_training_settings(tmp_path):
    cfg = load_train_config(PretrainConfig, None, ["model=tiny", "aux_alpha=0.01", "mtp_lambda_final=0.05"])
    m = cfg.model_config()
    assert (m.aux_loss_alpha, m.mtp_loss_weight, m.seq_aux) == (0.01, 0.05, True)
    assert load_train_config(PretrainConfig, None, ["model=tiny", "balance=none"]).model_config().aux_loss_alpha == 0
    assert load_train_config(PretrainConfig, None, ["model=tiny", "balance=aux_loss"]).model_config().seq_aux is False
    for field, owner in (("aux_loss_alpha", "aux_alpha"), ("mtp_loss_weight", "mtp_lambda"), ("seq_aux", "balance")):
        with pytest.raises(UserError, match=f"model.{field} is set by the training setting `{owner}`"):
            load_train_config(PretrainConfig, None, ["model=tiny", f"model.{field}=0.5"])


def test_recipe_configs_have_only_their_settings():
    from nanoseek.r1.configs import GRPOConfig, SFTConfig

    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert not grpo & {"data", "seq_len", "batch_size", "yarn_factor", "eval_batches", "mtp_lambda"}
    sft = {f.name for f in dataclasses.fields(SFTConfig)}
    assert {"data", "seq_len", "mtp_lambda"} <= sft and not sft & {"yarn_factor", "eval_batches", "task"}
    with pytest.raises(UserError, match="unknown setting 'seq_len' \\(not a GRPO setting\\)"):
        load_train_config(GRPOConfig, None, ["seq_len=64"])


def test_unknown_model_names_the_presets():
    with pytest.raises(UserError, match="model='huge' is neither a preset \\(tiny, small"):
        load_train_config(PretrainConfig, None, ["model=huge"])


def test_mfu_peak_comes_from_the_hardware_table(monkeypatch, capsys):
    from nanoseek.train import mfu

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert mfu.peak_flops(cuda, torch.bfloat16) == 312e12  # not an H100's 989.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert mfu.peak_flops(cuda, torch.bfloat16) == 989.5e12
    assert mfu.peak_flops(cuda, torch.bfloat16, peak_tflops=100) == 100e12  # declared wins
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    assert mfu.peak_flops(cuda, torch.bfloat16) is None  # unknown: no MFU rather than a wrong one
    assert capsys.readouterr().err.count("is not in the hardware table: MFU is not reported") == 1
    assert mfu.peak_flops(torch.device("cpu"), None) > 0


def test_unknown_peak_logs_no_mfu(data_dir, tmp_path, monkeypatch):
    import nanoseek.train.core as core

    monkeypatch.setattr(core, "peak_flops", lambda *a, **k: None)
    run_pretraining(config(data_dir, tmp_path / "run", max_steps=2))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows and all("mfu" not in r and r["tokens_per_s"] > 0 for r in rows)


def test_resume_survives_a_torn_metrics_log(data_dir, tmp_path):
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=3))
    with open(out / "metrics.jsonl", "ab") as f:  # what a full disk or a kill can leave behind
        f.write(b'{"step": 4, "loss": 1.\x00\x00\xff\xfe')
    run_pretraining(config(data_dir, out, max_steps=6), resume=True)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_loads_as_a_model(data_dir, tmp_path):
    """Every checkpoint holds config.json and the tokenizer beside its DCP shards, so it loads like a model
    directory; the last one equals the exported model."""
    import nanoseek
    from nanoseek.hf import load_model_and_tokenizer

    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=6))
    last = list_checkpoints(out / "checkpoints")[-1]
    from_checkpoint, exported = nanoseek.from_pretrained(last), nanoseek.from_pretrained(out / "model")
    a, b = from_checkpoint.state_dict(), exported.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, tokenizer = load_model_and_tokenizer(last)  # the tokenizer from the checkpoint itself
    assert (last / "tokenizer.json").is_file() and tokenizer.vocab_size == 300 <= model.config.vocab_size
