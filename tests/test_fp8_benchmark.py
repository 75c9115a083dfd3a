"""benchmarks/fp8.py runs end to end on small shapes, and its measurements point the way docs/fp8.md says."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load():
    threads = torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("fp8_benchmark", ROOT / "benchmarks" / "fp8.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # sets one thread
    torch.set_num_threads(threads)
    return module


def test_error_study_small(one_thread):
    result = load().gemm_error(M=64, K=256, N=128)
    rows = {(r["outliers"], r["factor"], r["gemm"]): r for r in result["rows"]}
    plain = rows[("none", 1, "fprop")]
    assert plain["bf16"] < 0.01 < plain["fine_1x128_128x128"] < 0.06  # E4M3 error, ten times BF16's
    extreme = rows[("values", 100000, "fprop")]
    assert extreme["fine_1x128_128x128_bulk"] < extreme["per_row_bulk"] < extreme["per_tensor_bulk"]
    last = result["underflow"][-1]
    assert last["fine_1x128"] < last["per_row"] < last["per_tensor"]


def test_fp8_caching_saves_activation_memory(one_thread):
    result = load().memory("tiny", batch=2, seq=32)
    assert result["fp8"] < 0.9 * result["bf16"]
    fp8_layer = sum(t["bytes"] for t in result["linear_fp8"])
    assert fp8_layer < 0.6 * sum(t["bytes"] for t in result["linear_bf16"])
    assert any(t["dtype"] == "float8_e4m3fn" for t in result["linear_fp8"])
