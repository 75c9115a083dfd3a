"""Cost accounting (nanoseek/cost/) against the published numbers (nanoseek/cost/published.py)
and against what torch's FlopCounterMode counts on the real nanoseek model."""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek import cost
from nanoseek.cli import main
from nanoseek.config import ModelConfig, preset
from nanoseek.model import DeepseekV3ForCausalLM

B = 1e9


def bundled(name: str) -> dict:
    return cost.load_config(name)[1]


# ------------------------------------------------------------------------------ published numbers
@pytest.mark.parametrize("name, expected", [
    ("deepseek-v3", 70_272),      # (512 + 64) * 61 * 2
    ("qwen2.5-72b", 327_680),     # 2 * 8 * 128 * 80 * 2
    ("llama-3.1-405b", 516_096),  # 2 * 8 * 128 * 126 * 2
])
def test_kv_cache_bytes_exact(name, expected):
    assert cost.kv_cache_bytes_per_token(bundled(name), "bf16") == expected
    assert cost.kv_cache_bytes_per_token(bundled(name), "fp8") == expected / 2


def test_v3_params():
    p = cost.params(bundled("deepseek-v3"))
    assert p["params_total"] == pytest.approx(671 * B, rel=0.01)
    # "37B active" is rounded to whole billions. Ours is 36.63B (no input-embedding table; -1.01%, a hair
    # outside 1%) and 37.55B with it (+1.5%): check the published precision, and both values exactly.
    assert round(p["params_active"] / B) == 37
    assert p["params_active"] == 36_625_603_584
    assert p["params_active_with_embed"] == 37_552_282_624
    # MTP: 11.6B of its own; the checkpoint also stores copies of embedding and head -> "14B".
    assert p["params_mtp_total"] / B == pytest.approx(11.61, abs=0.01)
    assert (p["params_mtp_total"] + p["params_embedding"] + p["params_head"]) / B == pytest.approx(14, abs=0.6)


@pytest.mark.parametrize("name, total, active", [
    ("deepseek-v2", 236 * B, 21 * B), ("deepseek-v2-lite", 15.7 * B, 2.4 * B),
    ("qwen2.5-72b", 72.7 * B, None), ("llama-3.1-405b", 405 * B, None),
])
def test_other_published_param_counts(name, total, active):
    p = cost.params(bundled(name))
    assert p["params_total"] == pytest.approx(total, rel=0.01)
    if active:
        assert p["params_active"] == pytest.approx(active, rel=0.025)  # published to 2 significant digits
    else:  # dense: every weight but the embedding lookup is active
        assert p["params_active_with_embed"] == p["params_total"]


@pytest.mark.parametrize("name, published, tol", [
    ("deepseek-v3", 250e9, 0.03), ("llama-3.1-405b", 2448e9, 0.03), ("deepseek-v2", 155e9, 0.05),
])
def test_train_flops_match_published(name, published, tol):
    assert cost.train_flops_per_token(bundled(name), 4096) == pytest.approx(published, rel=tol)


def test_qwen_train_flops_deviation_is_explained():
    """394 GFLOPs is not reproducible from Qwen2.5-72B's config; the stated reason's numbers must hold."""
    cfg = bundled("qwen2.5-72b")
    ours = cost.train_flops_per_token(cfg, 4096)
    dev = ours / 394e9 - 1
    reason = cost.PUBLISHED_NOTES.get(("qwen2.5-72b", "train_flops_per_token"))
    if abs(dev) > 0.03:
        print(f"\nQwen2.5-72B: ours {ours / 1e9:.1f} vs published 394 GFLOPs/token ({dev:+.1%}): {reason}")
        assert reason
    p = cost.params(cfg)
    assert 6 * p["params_total_no_embed"] / 1e9 == pytest.approx(421, abs=0.5)  # smallest convention
    assert 6 * p["params_total"] / 1e9 == pytest.approx(436, abs=0.5)
    assert ours / 1e9 == pytest.approx(445, abs=0.5)
    assert cost.train_flops_per_token({**cfg, "intermediate_size": 24576}, 4096) / 1e9 == pytest.approx(386, abs=0.5)


def test_v3_cost_table(capsys):
    rc = main(["cost", "--json", "--stage", "pretraining=2664K", "--stage", "context extension=119K",
               "--stage", "post-training=5K"])
    assert rc == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert [rows[s]["usd"] for s in ("pretraining", "context extension", "post-training", "total")] == \
        pytest.approx([5.328e6, 0.238e6, 0.01e6, 5.576e6])
    assert rows["total"]["gpu_hours"] == pytest.approx(2788e3)
    assert cost.dollars(2664e3, cost.usd_per_gpu_hour("H800")) == pytest.approx(5.328e6)


def test_v3_report_fp8_mfu():
    """6 x 37B active x 14.8T tokens over 2,664K H800-hours (DeepSeek-V3 report) at 2000 TFLOPS FP8 x
    112/132 SMs (20 SMs reserved for communication) = 20.2%."""
    flops_per_token, tokens, hours = 6 * 37e9, 14.8e12, 2664e3
    fp8_peak = 2000e12 * 112 / 132
    assert cost.mfu_from_gpu_hours(tokens, flops_per_token, hours, fp8_peak) == pytest.approx(0.202, abs=5e-4)
    assert cost.mfu_from_gpu_hours(tokens, flops_per_token, hours, fp8_peak / 2) == pytest.approx(0.404, abs=5e-4)
    tokens_per_s = tokens / (hours * 3600)  # per GPU
    assert cost.mfu(tokens_per_s, flops_per_token, fp8_peak) == pytest.approx(0.202, abs=5e-4)
    # hardware.json's 1979 TFLOPS with 20 of 132 SMs on communication:
    assert cost.peak_flops("H800", "fp8", comm_sms=20) == pytest.approx(1979e12 * 112 / 132)


def test_isca_mfu_and_gpu_hours():
    """272.80B tokens/day on 2048 H800s at 250 GFLOPs/token -> ~385 TFLOPS/GPU = 38.94% of 989.5."""
    tokens_per_s = 272.80e9 / 86400 / 2048
    assert tokens_per_s * 250e9 / 1e12 == pytest.approx(385, abs=0.5)
    m = cost.mfu(tokens_per_s, 250e9, cost.peak_flops("H800", "bf16"))
    assert m == pytest.approx(0.3894, abs=2e-4)
    assert cost.mfu(272.80e9 / 86400, 250e9, 989.5e12, n_gpus=2048) == pytest.approx(m)
    # The same rate prices 14.8T tokens at the reported 2,664K GPU-hours.
    assert cost.gpu_hours(14.8e12, 250e9, 989.5e12, m) == pytest.approx(2664e3, rel=0.005)


# -------------------------------------------------------------------------- against the real model
# Formula side: 2 x matmul weights per token (+ head) + attention core over the full T x T (causal=False,
# because FlopCounterMode counts SDPA / the q.k and p.v bmm's over the full matrix even when causal).
# FlopCounterMode side: mm/addmm/bmm/SDPA only, plus `_grouped_mm` (MoE experts) and the CPU flash SDPA
# kernel, which torch does not register and `cost.measured_forward_flops` adds. Norms, softmax, RoPE,
# SiLU, routing top-k and the embedding lookup are counted by neither.
TINY_VARIANTS = {
    "tiny": {},
    "small (q_lora)": {"_preset": "small"},
    "v2-style (no q_lora, softmax, greedy)": {"q_lora_rank": None, "scoring_func": "softmax",
                                              "topk_method": "greedy", "n_group": 1, "topk_group": 1},
    "dense (no experts)": {"n_routed_experts": 0},
    "odd expert width (per-expert matmuls)": {"moe_intermediate_size": 6},
    "attention bias, 2 shared, moe every 2nd": {"attention_bias": True, "n_shared_experts": 2,
                                                 "moe_layer_freq": 2, "first_k_dense_replace": 0},
}


def _cfg(spec: dict, **extra) -> ModelConfig:
    spec = dict(spec)
    return preset(spec.pop("_preset", "tiny"), **{"num_nextn_predict_layers": 0, **spec, **extra})


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_forward_flops_match_flop_counter(variant):
    cfg = _cfg(TINY_VARIANTS[variant])
    model = DeepseekV3ForCausalLM(cfg).eval()
    b, t = 2, 48
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    measured = cost.measured_forward_flops(model, ids)
    expected = cost.forward_flops_per_token(cfg, t, causal=False) * b * t
    assert measured == pytest.approx(expected, rel=0.02)
    assert model.num_parameters() == cost.params(cfg)["params_total"]


def test_mtp_and_backward_match_flop_counter():
    """With labels the model also runs the MTP module on T-1 positions; forward + backward = 3 x forward."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = preset("tiny")  # one MTP module
    model = DeepseekV3ForCausalLM(cfg)
    b, t = 2, 32
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    aten = torch.ops.aten
    mapping = {aten._grouped_mm: cost.measured.grouped_mm_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = model(ids, labels=ids)
        forward = counter.get_total_flops()
        out.loss.backward()
    main_model = cost.forward_flops_per_token(cfg, t, causal=False) * b * t
    mtp_only = (cost.forward_flops_per_token(cfg, t - 1, causal=False, include_mtp=True)
                - cost.forward_flops_per_token(cfg, t - 1, causal=False)) * b * (t - 1)
    assert forward == pytest.approx(main_model + mtp_only, rel=0.02)
    assert counter.get_total_flops() == pytest.approx(3 * (main_model + mtp_only), rel=0.02)
    p = cost.params(cfg)
    assert model.num_parameters() == p["params_total"] + p["params_mtp_total"]


# --------------------------------------------------------------------------- inputs and conventions
def test_modelconfig_dict_and_name_agree():
    cfg = preset("small")
    for other in (cfg.to_dict(), "small"):
        assert cost.train_flops_per_token(other, 1024) == cost.train_flops_per_token(cfg, 1024)
    # The v3-671b preset and the bundled DeepSeek-V3 config.json describe the same architecture.
    assert cost.params("v3-671b") == cost.params("deepseek-v3")
    assert ModelConfig.from_dict(bundled("deepseek-v3")).num_hidden_layers == 61


def test_causal_halves_attention_and_mtp_is_opt_in():
    cfg = bundled("deepseek-v3")
    full = cost.attention_flops_per_token(cfg, 4096, causal=False)
    assert cost.attention_flops_per_token(cfg, 4096) == full / 2
    assert full == 2 * 128 * (192 + 128) * 4096 * 61
    assert cost.train_flops_per_token(cfg, 4096, include_mtp=True) > cost.train_flops_per_token(cfg, 4096)
    # Dense: 2 x (all weights but the embedding table, less the norm scales, which are not matmuls).
    dense, p = bundled("llama-3.1-405b"), cost.params("llama-3.1-405b")
    norms = (2 * 126 + 1) * 16384
    assert cost.forward_flops_per_token(dense, 1) == \
        2 * (p["params_active"] - norms) + cost.attention_flops_per_token(dense, 1)


def test_tied_embeddings_counted_once():
    untied = cost.params("tiny")
    tied = cost.params(preset("tiny", tie_word_embeddings=True))
    assert tied["params_total"] == untied["params_total"] - untied["params_embedding"]
    assert tied["params_active"] == untied["params_active"]  # the head matmul still runs
    tied_cfg = preset("tiny", tie_word_embeddings=True)
    assert cost.train_flops_per_token(tied_cfg, 64) == cost.train_flops_per_token("tiny", 64)


def test_memory_defaults():
    m = cost.memory_bytes("tiny")
    n = cost.params("tiny")["params_total"] + cost.params("tiny")["params_mtp_total"]
    assert m["weight_bytes"] == 2 * n and m["optimizer_bytes"] == 12 * n and m["training_state_bytes"] == 16 * n
    assert cost.memory_bytes("tiny", moment_bytes=2, grad_bytes=0)["training_state_bytes"] == 10 * n


def test_parse_quantity():
    from nanoseek.cost.cli import parse_quantity

    assert parse_quantity("14.8T") == 14.8e12
    assert parse_quantity("2664K") == 2664e3
    assert parse_quantity("1.5e12") == 1.5e12
    assert parse_quantity("2,664,000") == 2664e3


# ------------------------------------------------------------------ DeepSeek's inference config format
# DeepSeek-V3 repository, inference/configs/config_671B.json (values as published there)
CONFIG_671B = {
    "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
    "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
    "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8", "original_seq_len": 4096,
    "rope_theta": 10000.0, "rope_factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
}
# inference/configs/config_16B.json (DeepSeek-V2-Lite): everything else takes ModelArgs' defaults
CONFIG_16B = {
    "vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27,
    "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
    "n_activated_experts": 6, "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "mscale": 0.707,
}


def _architecture(cfg):
    """The fields that decide the network (token ids, training knobs and the MTP depth aside)."""
    skip = {"bos_token_id", "eos_token_id", "aux_loss_alpha", "num_nextn_predict_layers", "num_mtp_layers",
            "torch_dtype", "initializer_range"}
    return {k: v for k, v in cfg.to_dict().items() if k not in skip}


@pytest.mark.parametrize("raw, name", [(CONFIG_671B, "v3-671b"), (CONFIG_16B, "v2-lite")])
def test_deepseek_inference_format_maps_to_the_same_model(raw, name):
    from nanoseek.config import ModelConfig

    ours = ModelConfig.from_dict(raw)
    assert _architecture(ours) == _architecture(preset(name))
    assert ours.num_nextn_predict_layers == 0  # DeepSeek's inference code has no MTP module


def test_config_671b_gives_the_671b_parameter_count(tmp_path, capsys):
    p = cost.params(CONFIG_671B)
    assert abs(p["params_total"] - 671e9) / 671e9 < 0.01  # DeepSeek-V3 report: 671B
    assert abs(p["params_active"] - 37e9) / 37e9 < 0.02  # and 37B activated
    assert p == {**cost.params("deepseek-v3"), "params_mtp_total": 0, "params_mtp_active": 0,
                 "mtp_modules": 0}
    (tmp_path / "config_671B.json").write_text(json.dumps(CONFIG_671B))
    assert main(["cost", str(tmp_path / "config_671B.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["params_total"] == p["params_total"]


def test_deepseek_inference_format_errors():
    from nanoseek.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="unknown field.*learning_rate"):
        ModelConfig.from_dict({**CONFIG_671B, "learning_rate": 1e-5})
    with pytest.raises(ConfigError, match="`n_group`"):  # 3 groups cannot split 256 experts
        ModelConfig.from_dict({**CONFIG_671B, "n_expert_groups": 3})
    with pytest.raises(ConfigError, match="`rope_factor`"):
        ModelConfig.from_dict({**CONFIG_671B, "rope_factor": "forty"})


# ------------------------------------------------------------------------------------ hardware table
@pytest.mark.parametrize("device_name, gpu", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA H200", "H200"), ("NVIDIA H800", "H800"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA GH200 480GB", None), ("NVIDIA GeForce RTX 4090", None), ("Tesla V100-SXM2-16GB", None),
])
def test_peak_flops_for_device_names(device_name, gpu):
    assert cost.gpu_for_device(device_name) == gpu
    peak = cost.peak_flops_for_device(device_name, "bf16")
    assert peak == (None if gpu is None else cost.peak_flops(gpu, "bf16"))


def test_peak_flops_for_device_precisions():
    a100 = "NVIDIA A100-SXM4-80GB"
    assert cost.peak_flops_for_device(a100) == 312e12
    assert cost.peak_flops_for_device(a100, "fp32") == 19.5e12
    assert cost.peak_flops_for_device(a100, "fp8") is None  # no FP8 tensor cores
    # an H100 is ~3x an A100 in bf16: reporting every GPU as an H100 understated A100 MFU ~3x
    assert cost.peak_flops_for_device("NVIDIA H100 80GB HBM3") / cost.peak_flops_for_device(a100) > 3


# ---------------------------------------------------------------------------------------------- CLI
def test_compare_prints_the_published_comparison_table(capsys):
    assert main(["cost", "--compare", "deepseek-v3", "qwen2.5-72b", "llama-3.1-405b"]) == 0
    out = capsys.readouterr().out
    for text in ("61 / 7168", "80 / 8192", "126 / 16384", "MLA, 128 heads", "GQA 64 q / 8 kv, d 128",
                 "GQA 128 q / 8 kv, d 128", "70,272 B", "327,680 B", "516,096 B", "250.4 G", "2,473.2 G",
                 "671B / 36.63B", "cannot come from Qwen2.5-72B"):
        assert text in out, text


def test_json_and_markdown(capsys, tmp_path):
    preset("tiny").save(tmp_path)  # a run directory holding config.json
    assert main(["cost", "deepseek-v3", str(tmp_path), "--json", "--tokens", "14.8T", "--tokens-per-s", "1000"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["deepseek-v3", str(tmp_path)]
    for r in rows:
        for key in ("params_total", "params_active", "kv_cache_bytes_per_token", "train_flops_per_token", "seq_len",
                    "gpu_hours", "usd", "mfu"):
            assert isinstance(r[key], (int, float)), key
    assert rows[0]["usd"] == pytest.approx(rows[0]["gpu_hours"] * 2)
    assert main(["cost", "deepseek-v2-lite", "--markdown"]) == 0
    assert "| KV cache per token | 31,104 B |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["cost", "gpt-5"], "unknown model 'gpt-5'"),
    (["cost", "/nonexistent/config.json"], "unknown model"),
    (["cost"], "name at least one model"),
    (["cost", "tiny", "--gpu", "Z80"], "unknown GPU"),
    (["cost", "tiny", "--gpu", "A100", "--precision", "fp8"], "no fp8"),
    (["cost", "tiny", "--kv-dtype", "fp7"], "invalid setting `--kv-dtype` = 'fp7'"),
    (["cost", "tiny", "--tokens", "lots"], "invalid setting `--tokens` = 'lots'"),
    (["cost", "tiny", "--stage", "x=1"], "without models"),
])
def test_bad_input_is_a_user_error(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unsupported_model_type(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 12}))
    assert main(["cost", str(tmp_path)]) == 2
    assert "unsupported model_type 'gpt2'" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert main(["cost", str(tmp_path)]) == 2
    assert "missing field" in capsys.readouterr().err


@pytest.mark.parametrize("name, dtype, torch_dtype", [("tiny", "fp32", "float32"), ("bench", "bf16", "bfloat16")])
def test_kv_formula_equals_the_inference_cache_allocation(name, dtype, torch_dtype):
    """The calculator's KV bytes/token equal what the engine's latent cache really allocates."""
    import torch

    from nanoseek.config import preset
    from nanoseek.model.cache import LatentKVCache
    from nanoseek.model import DeepseekV3ForCausalLM

    cfg = preset(name)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg).to(getattr(torch, torch_dtype))
    model.model.embed_tokens.weight = torch.nn.Parameter(torch.zeros(1, dtype=getattr(torch, torch_dtype)))
    cache = LatentKVCache.for_model(model, batch=3, max_len=17)
    assert cache.nbytes() / (3 * 17) == cost.kv_cache_bytes_per_token(cfg, dtype)
