"""ModelConfig validation and reading (types, wrong-kind paths, non-UTF-8), and the per-epoch shuffle
shared by the data loader, SFT and GRPO."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nanoseek.config import PRESETS, ConfigError, ModelConfig, preset
from nanoseek.data.shuffle import EpochOrder, epoch_permutation


# ---- ModelConfig ------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(n_group="2"), "`n_group` = '2': must be an integer"),
    (dict(hidden_size=64.0), "`hidden_size` = 64.0: must be an integer"),
    (dict(norm_topk_prob="yes"), "`norm_topk_prob` = 'yes': must be true or false"),
    (dict(rope_theta=float("nan")), "`rope_theta` = nan: must be a finite number"),
    (dict(routed_scaling_factor=True), "`routed_scaling_factor` = True: must be a number"),
    (dict(q_lora_rank="none"), "`q_lora_rank` = 'none': must be an integer or null"),
    (dict(mtp_loss_weight=-1.0), "`mtp_loss_weight` = -1.0: must be >= 0"),
    (dict(rms_norm_eps=0.0), "`rms_norm_eps` = 0.0: must be > 0"),
    (dict(n_group=3), "n_routed_experts=8 is not divisible by n_group"),
])
def test_bad_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preset("tiny", **change)
    with pytest.raises(ConfigError, match="`" + next(iter(change)) + "`"):  # and from a config.json dict
        ModelConfig.from_dict({**preset("tiny").to_dict(), **change})


def test_every_preset_is_valid_and_round_trips(tmp_path):
    for name in PRESETS:
        cfg = preset(name)
        cfg.save(tmp_path / name)  # a directory name: config.json inside
        assert ModelConfig.from_json(tmp_path / name) == cfg
    assert not list(tmp_path.rglob(".*.tmp"))  # written through nanoseek.files (atomic)


def test_unknown_preset_lists_them():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of: " + ", ".join(PRESETS)):
        preset("huge")


def test_from_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json at"):
        ModelConfig.from_json(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="no config.json at"):
        ModelConfig.from_json(tmp_path)  # a directory without one
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(ConfigError, match="exists but is not a regular file"):
        ModelConfig.from_json(tmp_path / "fifo.json")
    (tmp_path / "latin1.json").write_bytes(b'{"hidden_size": "\xe9"}')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        ModelConfig.from_json(tmp_path / "latin1.json")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        ModelConfig.from_json(tmp_path / "list.json")


# ---- per-epoch shuffling ----------------------------------------------------------------------------
def test_loader_order_is_numpy_pcg64_of_seed_and_epoch():
    """The pretraining loader's order, pinned: resumed runs and old checkpoints depend on it."""
    for seed, epoch in [(0, 0), (3, 1), (1234, 7)]:
        expected = np.random.default_rng([seed, epoch]).permutation(100)
        assert np.array_equal(epoch_permutation(100, seed, epoch), expected)


def test_epoch_order_positions_streams_and_resume():
    order = EpochOrder(10, seed=5)
    walk = [order[p] for p in range(30)]
    for e in range(3):
        assert sorted(walk[10 * e:10 * e + 10]) == list(range(10))  # each epoch visits all once
        assert walk[10 * e:10 * e + 10] == epoch_permutation(10, 5, e).tolist()
    assert walk[:10] != walk[10:20]  # reshuffled every epoch
    resumed = EpochOrder(10, seed=5)
    assert [resumed[p] for p in range(17, 30)] == walk[17:]  # depends on position only
    sft, grpo = EpochOrder(50, 0, stream="sft"), EpochOrder(50, 0, stream="grpo-prompts")
    assert [sft[p] for p in range(50)] != [grpo[p] for p in range(50)]  # independent streams
    assert [EpochOrder(4, 0, shuffle=False)[p] for p in range(6)] == [0, 1, 2, 3, 0, 1]
    assert sorted(EpochOrder(8, seed=-3)[p] for p in range(8)) == list(range(8))  # negative seeds work
    with pytest.raises(ValueError):
        EpochOrder(0, 0)
