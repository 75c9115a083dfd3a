"""Numerical parity with transformers' DeepseekV3ForCausalLM (the reference implementation) and
checkpoint round trips in both directions."""

import json
import warnings

import pytest
import torch

import nanoseek
from nanoseek.config import preset
from nanoseek.model.state_dict_adapter import CheckpointError, dequantize_fp8_blocks

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

CONFIGS = {
    "q_lora+groups": dict(q_lora_rank=32, n_group=2, topk_group=1),
    "no_q_lora": dict(q_lora_rank=None, n_group=1, topk_group=1, rope_interleave=False),
    "yarn+4groups": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                         rope_scaling=YARN, first_k_dense_replace=2, n_shared_experts=2),
    "top1+narrow_nope": dict(num_experts_per_tok=1, n_group=2, topk_group=2, routed_scaling_factor=1.0,
                              qk_nope_head_dim=8, v_head_dim=24),
}


def hf_model(cfg, bias_std=0.1):
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type")}
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**d)).eval()
    with torch.no_grad():  # a non-zero balancing bias: it must steer selection but not the weights
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, bias_std)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    cfg = preset("tiny", num_nextn_predict_layers=0, **CONFIGS[name])
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path / "hf")
    ours = nanoseek.from_pretrained(tmp_path / "hf").eval()
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in ours.moe_layers())
    x = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        diff = (ref(x).logits - ours(x).logits).abs().max().item()
    assert diff < 1e-4, diff

    # ours -> disk -> transformers gives the same logits again
    ours.save_pretrained(tmp_path / "ours")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(x).logits - ours(x).logits).abs().max().item() < 1e-4


def test_yarn_is_really_active_in_both(tmp_path):
    cfg = preset("tiny", num_nextn_predict_layers=0, rope_scaling=YARN)
    ref = hf_model(cfg)
    assert ref.config.rope_parameters["rope_type"] == "yarn"
    ours = nanoseek.DeepseekV3ForCausalLM(cfg)
    plain = nanoseek.DeepseekV3ForCausalLM(cfg.replace(rope_scaling=None))
    assert not torch.allclose(ours.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    assert torch.allclose(ours.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert ours.model.layers[0].self_attn.scale == pytest.approx(ref.model.layers[0].self_attn.scaling)


def test_mtp_roundtrip_and_transformers_drop(tmp_path, capsys):
    cfg = preset("tiny")  # one MTP module
    model = nanoseek.DeepseekV3ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "ours")
    keys = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert keys["num_nextn_predict_layers"] == 1
    loaded = nanoseek.from_pretrained(tmp_path / "ours")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    # transformers has no MTP modules: what it saves has none, and we load it with MTP off + one warning
    # line (nanoseek.errors.warn, not a Python warning quoting source code)
    AutoModelForCausalLM.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = nanoseek.from_pretrained(tmp_path / "hf")
    lines = [line for line in capsys.readouterr().err.splitlines() if "MTP" in line]
    assert len(lines) == 1 and lines[0].startswith("nanoseek: warning:") and "no MTP weights" in lines[0]
    assert not [w for w in caught if "MTP" in str(w.message)]
    assert again.config.num_nextn_predict_layers == 0 and len(again.mtp) == 0


def test_sharded_checkpoint_with_index(tmp_path):
    model = nanoseek.DeepseekV3ForCausalLM(preset("tiny")).eval()
    model.save_pretrained(tmp_path, safe_max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    x = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, nanoseek.from_pretrained(tmp_path)(x).logits)


def test_mismatched_checkpoint_names_key_and_shapes(tmp_path):
    nanoseek.DeepseekV3ForCausalLM(preset("tiny")).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["kv_lora_rank"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"kv_a_proj_with_mqa.weight: checkpoint shape \(40, 64\) != model"):
        nanoseek.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        nanoseek.from_pretrained(tmp_path / "nope")


def test_fp8_block_dequantisation_matches_float64_reference():
    torch.manual_seed(1)
    w = torch.randn(300, 200) * 3
    out_blocks, in_blocks = -(-300 // 128), -(-200 // 128)
    # quantise per 128x128 block the way DeepSeek does: scale = amax / 448
    scale = torch.zeros(out_blocks, in_blocks)
    q = torch.empty_like(w)
    for i in range(out_blocks):
        for j in range(in_blocks):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            scale[i, j] = blk.abs().max() / 448
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = blk / scale[i, j]
    q8 = q.to(torch.float8_e4m3fn)
    ref = torch.empty(300, 200, dtype=torch.float64)
    for r in range(300):
        for c in range(0, 200, 32):  # 32-wide strips never straddle a 128 block edge
            ref[r, c:c + 32] = q8[r, c:c + 32].double() * scale[r // 128, c // 128].double()
    got = dequantize_fp8_blocks(q8, scale, dtype=torch.float64)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)
    assert (got - w.double()).abs().max() / w.abs().max() < 0.07  # E4M3 keeps ~3 mantissa bits


def test_fp8_checkpoint_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model = nanoseek.DeepseekV3ForCausalLM(preset("tiny")).eval()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    w = tensors[name]
    scale = torch.full((-(-w.shape[0] // 128), -(-w.shape[1] // 128)), float(w.abs().max() / 448))
    tensors[name] = (w / scale[0, 0]).to(torch.float8_e4m3fn)
    tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = nanoseek.from_pretrained(tmp_path)
    got = loaded.model.layers[0].self_attn.kv_b_proj.weight
    assert got.dtype == torch.float32 and (got - w).abs().max() < w.abs().max() * 0.07
