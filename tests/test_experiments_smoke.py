"""The experiment scripts in benchmarks/ run end to end (`--quick`: tiny model, a few steps)."""

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_balance_experiment_quick(tmp_path):
    threads = torch.get_num_threads()
    try:
        results = load("balance_experiment").main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert set(results) == {"aux_free", "aux_loss", "none"}
    for r in results.values():
        assert r["val_loss"] > 0 and r["load_max_mean"] >= 1.0
    assert (tmp_path / "balance.png").stat().st_size > 0
    assert "| `aux_free` |" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["results"].keys() == results.keys()


def test_context_extension_quick(tmp_path):
    threads = torch.get_num_threads()
    try:
        results = load("context_extension").main(["--quick", "--corpus", "long", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    rows = results["long"]["rows"]
    assert len(rows) == 5
    for r in rows.values():
        assert len(r["4L"]["buckets"]) == 4 and r["L"]["loss"] > 0
    yarn = json.loads((tmp_path / "long" / "yarn" / "model" / "config.json").read_text())
    assert yarn["rope_scaling"]["rope_type"] == "yarn"
    assert "YaRN stage at 4L" in (tmp_path / "results.md").read_text()
