"""Checkpoints: no code execution on --resume (trainer state and DCP files), format versions, full disk,
divergence never checkpointed, checkpoints of earlier single-process versions still resume."""

import json
import math
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from safetensors.torch import load_file

from nanoseek.errors import UserError
from nanoseek.dcp_safe import read_model_tensors
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
    sums = {str(f.relative_to(ckpt)): file_sha256(f) for f in sorted(ckpt.rglob("*"))
            if f.is_file() and f.name != CHECKSUMS}
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


def test_crafted_dcp_metadata_does_not_execute(data_dir, tmp_path):
    """torch's own DCP reader unpickles dcp/.metadata in full; ours refuses anything but checkpoint metadata."""
    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=3))
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))
    rewrite_checksums(ckpt)
    with pytest.raises(UserError, match=r"refusing to load it, it holds more than checkpoint data \(io.open is not"):
        run_pretraining(config(data_dir, out, max_steps=6), resume=True)
    assert not marker.exists()
    import nanoseek

    with pytest.raises(UserError, match="refusing to load it"):  # the checkpoint as a model: the same reader
        nanoseek.from_pretrained(ckpt)
    assert not marker.exists()


def test_crafted_dcp_value_does_not_execute(tmp_path):
    """Non-tensor values (an optimizer's lr) are pickles in DCP; a value holding code is refused unrun."""
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from nanoseek.dcp_safe import SafeLoadPlanner, UnsafeCheckpointError

    planner = SafeLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("lr"), dest_offsets=torch.Size([0]),
                    storage_index=MetadataIndex("lr"), storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
    plain = io.BytesIO()
    torch.save(0.001, plain)
    plain.seek(0)
    planner.load_bytes(item, plain)
    assert planner.state_dict == {"lr": 0.001}
    marker = tmp_path / "pwned"
    crafted = io.BytesIO()
    torch.save(Exploit(marker), crafted)
    crafted.seek(0)
    with pytest.raises(UnsafeCheckpointError, match="lr: Weights only load failed"):
        planner.load_bytes(item, crafted)
    assert not marker.exists()


def test_single_process_checkpoint_of_earlier_versions_resumes(data_dir, tmp_path):
    """Before one process took the mesh path, its checkpoints held the model in HF format and the optimizer in
    the trainer state: such a checkpoint resumes and continues exactly like the DCP checkpoint of the same step."""
    from nanoseek.hf import save_pretrained
    from nanoseek.dcp_safe import read_model_tensors
    from nanoseek.train.trainer_state import write_trainer_state

    straight, out = tmp_path / "straight", tmp_path / "run"
    reference = run_pretraining(config(data_dir, straight, max_steps=6))
    trainer = run_pretraining(config(data_dir, out, max_steps=3))
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    state = load_trainer_state(ckpt)
    state["optimizer"] = trainer.optimizer.state_dict()  # the state of step 3: the run ended there
    for f in list(ckpt.iterdir()):  # rewrite it in the old layout
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    save_pretrained(trainer.model, ckpt)
    write_trainer_state(ckpt, state)
    rewrite_checksums(ckpt)
    resumed = run_pretraining(config(data_dir, out, max_steps=6), resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in list(reference.history)[3:]]
    new = read_model_tensors(list_checkpoints(out / "checkpoints")[-1])
    old = read_model_tensors(list_checkpoints(straight / "checkpoints")[-1])
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


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


@pytest.mark.parametrize("target", ["nanoseek.train.trainer_state.save_file",
                                    "torch.distributed.checkpoint.filesystem.FileSystemWriter.write_data"])
def test_full_disk_during_checkpoint(data_dir, tmp_path, monkeypatch, target):
    """A full disk while DCP writes the shards (OSError) or the trainer state is written (safetensors reports
    ENOSPC as a RuntimeError): one clear error, nothing partial left, the previous checkpoint intact."""

    out = tmp_path / "run"
    run_pretraining(config(data_dir, out, max_steps=3))
    good = list_checkpoints(out / "checkpoints")[-1]
    good_files = {f: f.read_bytes() for f in good.rglob("*") if f.is_file()}

    def disk_full(*args, **kwargs):
        if "safetensors" in target or "trainer_state" in target:
            raise RuntimeError("No space left on device (os error 28)")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(target, disk_full)
    with pytest.raises(UserError, match="could not write checkpoint step_00000006 .*No space left.*intact"):
        run_pretraining(config(data_dir, out, max_steps=6), resume=True)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [good.name]  # no .step_*.tmp left
    assert {f: f.read_bytes() for f in good.rglob("*") if f.is_file()} == good_files
    monkeypatch.undo()  # space is back
    trainer = run_pretraining(config(data_dir, out, max_steps=6), resume=True)
    assert trainer.history[0]["step"] == 4 and trainer.step == 6
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def test_divergence_stops_without_writing_nonfinite_weights(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = config(data_dir, out, max_steps=30, lr=1e3, warmup_steps=0, save_every=1, keep_last=2, eval_every=0)
    with pytest.raises(UserError, match="training diverged: non-finite loss or gradients at 3 consecutive steps"):
        run_pretraining(cfg)
    ckpts = list_checkpoints(out / "checkpoints")
    assert ckpts and all(_all_finite(read_model_tensors(p)) for p in ckpts)
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
    assert _all_finite(load_file(out / "model" / "model.safetensors"))
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
    from nanoseek.config import preset
    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.train.config import TrainerConfig
    from nanoseek.train.core import Trainer

    class NoData:
        def state_dict(self):
            return {}

    model = DeepseekV3ForCausalLM(preset("tiny"))
    trainer = Trainer(TrainerConfig(out_dir=str(tmp_path), tensorboard=False), model, 1.0, 1)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="refusing to write checkpoint step_00000000: the weights hold NaN or inf"):
        trainer.save(NoData())
    assert not (tmp_path / "checkpoints" / "step_00000000").exists()
