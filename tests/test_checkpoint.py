"""Checkpoints: no code execution on --resume, format versions, full disk, divergence never checkpointed."""

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch

from nanoseek.errors import UserError
from nanoseek.files import file_sha256
from nanoseek.train.checkpoint import CHECKSUMS, latest_checkpoint, list_checkpoints
from nanoseek.train.trainer_state import (
    LEGACY_STATE,
    STATE_JSON,
    STATE_TENSORS,
    StateEncoder,
    decode_state,
    load_trainer_state,
)
from nanoseek.train.metrics_log import read_metrics
from nanoseek.train.pretrain import run_pretraining
from tests.test_train import config


def rewrite_checksums(ckpt):
    """What an attacker (or a well-meaning script) does after editing a checkpoint."""
    sums = {f.name: file_sha256(f) for f in sorted(ckpt.iterdir()) if f.name != CHECKSUMS}
    (ckpt / CHECKSUMS).write_text(json.dumps(sums))


class Exploit:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_state_round_trip_without_pickle():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                                    "numpy": np.random.get_state()},
             "data": {"consumed": 7, "name": "x", "none": None, "pair": (1, 2.5), "nested": [[1], {"a": True}]},
             "weird_keys": {"__tensor__": 1, 3: "int key"}}
    enc = StateEncoder()
    doc = json.loads(json.dumps(enc.encode(state)))  # really through JSON text
    back = decode_state(doc, enc.tensors)
    assert back["data"] == state["data"] and back["weird_keys"] == state["weird_keys"]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["rng"]["python"] == state["rng"]["python"]
    np_state = back["rng"]["numpy"]
    assert np_state[0] == "MT19937" and np.array_equal(np_state[1], state["rng"]["numpy"][1])
    assert np_state[1].dtype == np.uint32
    random.setstate(back["rng"]["python"])
    np.random.set_state(np_state)
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(back["optimizer"])
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])
    with pytest.raises(TypeError, match="cannot be stored"):
        StateEncoder().encode({"x": object()})


def test_crafted_pickle_does_not_execute(data_dir, tmp_path):
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=3))
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    (ckpt / STATE_JSON).unlink()
    (ckpt / STATE_TENSORS).unlink()
    (ckpt / LEGACY_STATE).write_bytes(pickle.dumps({"step": 3, "x": Exploit(marker)}))
    rewrite_checksums(ckpt)
    assert latest_checkpoint(out / "checkpoints") == ckpt  # the checksums say it is fine
    with pytest.raises(UserError, match="pickled trainer state .* no longer loads .*format 2"):
        run_pretraining(config(data_dir, out, max_steps=6), resume=True)
    assert not marker.exists()
    # and from the command line: exit status 2, one error line, no traceback
    from nanoseek.cli import main

    args = [f"{k}={v}" for k, v in (("model", "tiny"), ("model.vocab_size", 320), ("data", data_dir),
                                    ("out_dir", out), ("seq_len", 32), ("batch_size", 4), ("max_steps", 6),
                                    ("tensorboard", "false"), ("sample_prompt", '""'))]
    assert main(["pretrain", "--resume", *args]) == 2
    assert not marker.exists()


def test_other_format_version_is_one_error(data_dir, tmp_path):
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=3))
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    doc = json.loads((ckpt / STATE_JSON).read_text())
    doc["version"] = 99
    (ckpt / STATE_JSON).write_text(json.dumps(doc))
    rewrite_checksums(ckpt)
    with pytest.raises(UserError, match="trainer-state format version 99; this nanoseek reads version 2"):
        load_trainer_state(ckpt)
    doc["version"], doc["state"] = 2, {"__eval__": "os.system('true')"}
    (ckpt / STATE_JSON).write_text(json.dumps(doc))
    with pytest.raises(UserError, match="unreadable trainer state"):
        load_trainer_state(ckpt)


@pytest.mark.parametrize("target", ["nanoseek.train.trainer_state.save_file", "nanoseek.train.checkpoint.save_pretrained"])
def test_full_disk_runtime_error_during_checkpoint(data_dir, tmp_path, monkeypatch, target):
    """torch / safetensors report ENOSPC as RuntimeError: still one clear error, nothing partial left."""

    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=3))
    good = list_checkpoints(out / "checkpoints")[-1]
    good_files = {f.name: f.read_bytes() for f in good.iterdir()}

    def disk_full(*args, **kwargs):
        raise RuntimeError("No space left on device (os error 28)")

    monkeypatch.setattr(target, disk_full)
    with pytest.raises(UserError, match="could not write checkpoint step_00000006 .*No space left.*intact"):
        run_pretraining(config(data_dir, out, max_steps=6), resume=True)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [good.name]  # no .step_*.tmp left
    assert {f.name: f.read_bytes() for f in good.iterdir()} == good_files
    monkeypatch.undo()  # space is back
    trainer = run_pretraining(config(data_dir, out, max_steps=6), resume=True)
    assert trainer.history[0]["step"] == 4 and trainer.step == 6
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def _all_finite(path) -> bool:
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(path / "model.safetensors").values()
               if t.is_floating_point())


def test_divergence_stops_without_writing_nonfinite_weights(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = config(data_dir, out, max_steps=30, lr=1e3, warmup_steps=0, save_every=1, keep_last=2, eval_every=0)
    with pytest.raises(UserError, match="training diverged: non-finite loss or gradients at 3 consecutive steps"):
        run_pretraining(cfg)
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts and all(_all_finite(p) for p in ckpts)
    assert not (out / "model").exists()  # no final model from a diverged run
    rows = read_metrics(out / "metrics.jsonl")
    skipped = [r["step"] for r in rows if r["skipped"]]
    good = [r["step"] for r in rows if not r["skipped"]]
    assert len(skipped) == 2 and skipped == list(range(good[-1] + 1, good[-1] + 3))  # the 3rd stopped the run
    assert all(not math.isfinite(r["loss"]) or not math.isfinite(r["grad_norm"]) for r in rows if r["skipped"])
    assert rows[-1]["step"] < 30
    # the newest checkpoint is the last good step, not pushed out by checkpoints of skipped steps
    assert ckpts[-1].name == f"step_{good[-1]:08d}"


def test_divergence_skip_mode_finishes_with_finite_weights(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(data_dir, out, max_steps=16, lr=1e3, warmup_steps=0, eval_every=0, save_every=8,
                 nonfinite="skip")
    trainer = run_pretraining(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    assert trainer.step == 16 and any(r["skipped"] == 1 for r in rows)
    assert _all_finite(out / "model")
    assert "non-finite loss or gradients, update skipped" in capsys.readouterr().err


def test_tampered_trainer_state_values_are_one_error(data_dir, tmp_path):
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=3))
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    doc = json.loads((ckpt / STATE_JSON).read_text())
    doc["state"]["rng"]["python"] = "not a state"
    (ckpt / STATE_JSON).write_text(json.dumps(doc))
    rewrite_checksums(ckpt)
    with pytest.raises(UserError, match="its trainer state does not fit this run"):
        run_pretraining(config(data_dir, out, max_steps=6), resume=True)


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    from nanoseek.train.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="refusing to write checkpoint step_00000005: 1 tensors hold NaN or inf"):
        save_checkpoint(tmp_path / "ckpts", 5, model, {"step": 5})
    assert not (tmp_path / "ckpts").exists()
