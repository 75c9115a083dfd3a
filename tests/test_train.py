"""Pretraining system: exact resume, checkpoint safety, config handling, bad input."""

import errno
import json
from pathlib import Path

import pytest
import torch

from nanoseek.errors import UserError
from nanoseek.train.checkpoint import latest_checkpoint, list_checkpoints
from nanoseek.train.config import TrainConfig, load_train_config
from nanoseek.train.pretrain import run_pretraining


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from nanoseek.data import prepare, synthetic_corpus, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pt")
    corpus = root / "corpus.jsonl"
    write_corpus(synthetic_corpus(400, seed=0), corpus)
    tok = train_tokenizer([corpus], 300, root / "tok", progress=False)
    prepare([corpus], tok, root / "data", val_fraction=0.05, progress=False)
    return root / "data"


def config(data_dir, out, **kw):
    base = dict(model="tiny", model_overrides={"vocab_size": 320}, data=str(data_dir), out_dir=str(out),
                seq_len=32, batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=1,
                save_every=3, sample_prompt="", tensorboard=False, bias_gamma=0.01)
    base.update(kw)
    return TrainConfig(**base)


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


def test_corrupt_checkpoint_is_skipped(data_dir, tmp_path):
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=6))
    ckpts = list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000006"]
    with open(ckpts[-1] / "model.safetensors", "r+b") as f:  # flip bytes in the newest
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint .*step_00000006"):
        assert latest_checkpoint(out / "checkpoints") == ckpts[0]


def test_full_disk_keeps_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=3))
    import nanoseek.train.checkpoint as ckpt

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_pretrained", no_space)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoints are intact"):
        run_pretraining(config(data_dir, out, max_steps=6), resume=True)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003"]
    assert latest_checkpoint(out / "checkpoints") is not None
    assert not any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir())


def test_bad_inputs_give_clear_errors(data_dir, tmp_path):
    with pytest.raises(UserError, match="tokenizer has 300 tokens but the model's vocab_size is 128"):
        run_pretraining(config(data_dir, tmp_path, model_overrides={"vocab_size": 128}))
    with pytest.raises(UserError, match="seq_len=1024 exceeds the model's max_position_embeddings=512"):
        run_pretraining(config(data_dir, tmp_path, seq_len=1024))
    with pytest.raises(UserError, match="nowhere does not exist"):
        run_pretraining(config(tmp_path / "nowhere", tmp_path))


def test_toml_and_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "tiny"\nmax_steps = 7\nschedule = "wsd"\n[model_overrides]\nn_routed_experts = 16\n')
    cfg = load_train_config(TrainConfig, str(toml), ["lr=0.01", "model.n_group=4", "compile=true"])
    assert (cfg.max_steps, cfg.schedule, cfg.lr, cfg.compile) == (7, "wsd", 0.01, True)
    assert cfg.model_config().n_routed_experts == 16 and cfg.model_config().n_group == 4
    with pytest.raises(UserError, match="unknown setting 'nope'"):
        load_train_config(TrainConfig, str(toml), ["nope=1"])
    with pytest.raises(UserError, match="expected"):
        load_train_config(TrainConfig, None, ["max_steps=ten"])
    with pytest.raises(UserError, match="`schedule`"):
        load_train_config(TrainConfig, None, ["schedule=linear"])


def test_yarn_stage_switches_rope():
    cfg = TrainConfig(model="tiny", yarn_factor=4, yarn_original_len=128, seq_len=512)
    m = cfg.model_config()
    assert m.rope_type == "yarn" and m.rope_scaling["factor"] == 4
    assert m.rope_scaling["original_max_position_embeddings"] == 128 and m.max_position_embeddings >= 512
