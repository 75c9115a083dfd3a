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


def test_gpu_check_dry_run(tmp_path, monkeypatch):
    """The prepared GPU script at toy sizes on CPU: every section runs (so it has not rotted when a GPU comes)."""
    import subprocess
    import sys

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["section"] for r in rows] == ["env", "fp8_gemm", "fp8_linear", "fp8_speed", "single_gpu", "fsdp_bf16",
                                            "mfu"]
    assert all("error" not in r for r in rows)
    by = {r["section"]: r for r in rows}
    assert by["fp8_gemm"]["64x200x96_max_rel_err"] < 1e-5 and by["single_gpu"]["resumed_from"] == 30
    assert by["single_gpu"]["loss_at_40"] < by["single_gpu"]["first_loss"]
