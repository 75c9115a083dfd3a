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


def test_part_flops_of_the_bench_preset():
    from nanoseek.config import preset

    flops = bench.part_flops(preset("bench"), tokens=8 * 256, seq=256)
    # per token, forward multiply-adds: projections 126,976 x 4 layers, attention core 4 heads x 256 x (48 + 32)
    # x 4, dense FFN 3 x 256 x 768, 3 MoE layers of shared 3 x 256 x 128 + 4 routed x 3 x 256 x 128 and a
    # 256 x 16 router, lm_head 256 x 4096; x 6 FLOPs for forward + backward
    assert sum(flops.values()) == pytest.approx(6 * 2048 * (126976 * 4 + 327680 + 589824 + 3 * (98304 + 393216 + 4096)
                                                        + 1048576))
    assert flops["routed expert GEMMs"] == 6 * 2048 * 3 * 4 * 3 * 256 * 128


def test_part_flops_agree_with_flop_counter_where_it_counts(one_thread):
    """FlopCounterMode has no formula for grouped_mm: everything else must match its count exactly."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nanoseek.config import preset
    from nanoseek.model import DeepseekV3ForCausalLM

    cfg = preset("tiny", num_nextn_predict_layers=0, aux_loss_alpha=0.0)
    model = DeepseekV3ForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).loss.backward()
    flops = bench.part_flops(cfg, tokens=32, seq=16)
    assert counter.get_total_flops() == sum(flops.values()) - flops["routed expert GEMMs"]


def test_ops_are_booked_to_parts():
    assert bench.part_of(["experts", "moe"], "aten::mm", gemm=True, sdpa=False) == "routed expert GEMMs"
    assert bench.part_of(["experts", "moe"], "aten::index_add_", gemm=False, sdpa=False) == "MoE dispatch/combine"
    assert bench.part_of(["attention"], "aten::bmm", gemm=True, sdpa=True) == "attention core (SDPA)"
    assert bench.part_of(["attention"], "aten::mm", gemm=True, sdpa=False) == "attention projections"
    assert bench.part_of([], "aten::_log_softmax", gemm=False, sdpa=False) == "loss (log-softmax + NLL)"
    assert bench.part_of(["norms", "attention"], "aten::mul", gemm=False, sdpa=False) == "norms"

    from nanoseek.config import preset

    assert set(bench.part_flops(preset("bench"), 1, 1)) <= set(bench.PARTS)  # every FLOP has a row
