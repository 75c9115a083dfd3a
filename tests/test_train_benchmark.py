"""The statistics of benchmarks/train_throughput.py's protocol (no timing is asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load()


def test_quantile_interpolates():
    assert bench.quantile([3, 1, 2, 4], 0.0) == 1
    assert bench.quantile([3, 1, 2, 4], 1.0) == 4
    assert bench.quantile([1, 2, 3, 4], 0.25) == pytest.approx(1.75)
    assert bench.quantile([1, 2, 3, 4], 0.5) == pytest.approx(2.5)
    assert bench.quantile([7], 0.75) == 7


def test_spread_median_iqr_and_ends():
    s = bench.spread([5.0, 1.0, 100.0, 2.0, 3.0])  # one outlier moves neither median nor IQR much
    assert (s.median, s.q1, s.q3, s.lo, s.hi) == (3.0, 2.0, 5.0, 1.0, 100.0)
    with pytest.raises(ValueError):
        bench.spread([])


def test_scaled_spread_through_a_decreasing_map_keeps_ends_ordered():
    tps = bench.spread([0.5, 1.0, 2.0]).scaled(lambda s: 100 / s)  # seconds per step -> tokens/s
    assert (tps.median, tps.lo, tps.hi) == (100.0, 50.0, 200.0)
    assert tps.q1 <= tps.median <= tps.q3


def test_rounds_alternate_which_model_goes_first():
    orders = bench.round_orders(4)
    assert orders == [("nanoseek", "transformers"), ("transformers", "nanoseek")] * 2
    assert all(sorted(o) == ["nanoseek", "transformers"] for o in orders)


def test_round_ratios_pair_adjacent_blocks():
    # transformers' seconds over nanoseek's: > 1 means nanoseek is faster
    assert bench.round_ratios([1.0, 2.0], [1.5, 2.0]) == [1.5, 1.0]
    with pytest.raises(ValueError):
        bench.round_ratios([1.0], [1.0, 2.0])


def test_format_names_median_and_both_spreads():
    text = bench.fmt(bench.spread([1.0, 2.0, 3.0]), "x", 2)
    assert text.startswith("2.00x") and "IQR 1.50-2.50" in text and "min-max 1.00-3.00" in text
