"""`nanoseek plan`: the planner's blocks add up to nanoseek.cost's exact counts, the schedule formulas,
memory sharding, node-limited routing, the V3 run and its what-ifs, the serving view, the CLI
(one error line per bad input), and calibration against a real training step."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from nanoseek import cost
from nanoseek.cli import main
from nanoseek.plan import Layout, cluster, plan_serving, plan_training
from nanoseek.plan.blocks import blocks
from nanoseek.plan.layout import balanced_layers, chunk_blocks, split_layers
from nanoseek.plan.sweep import sweep
from nanoseek.plan.time import bubble
from nanoseek.plan.v3 import v3_plans

H800 = cluster("H800", 2048, comm_sms=20)


@pytest.mark.parametrize("model", ["deepseek-v3", "tiny", "llama-3.1-405b", "deepseek-v2-lite"])
def test_blocks_add_up_to_the_exact_counts(model):
    bl = blocks(model, 4096)
    p = cost.params(model)
    assert sum(b.dense_params + b.expert_params for b in bl) == p["params_total"] + p["params_mtp_total"]
    exact = cost.forward_flops_per_token(model, 4096, include_mtp=True)
    assert sum(b.forward_flops for b in bl) == pytest.approx(exact)
    assert sum(b.forward_flops for b in blocks(model, 4096, include_mtp=False)) == pytest.approx(
        cost.forward_flops_per_token(model, 4096))


# DeepSeek's own inference format (inference/configs/config_671B.json in the DeepSeek-V3 repository)
CONFIG_671B = {
    "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
    "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
    "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8", "original_seq_len": 4096,
    "rope_theta": 10000.0, "rope_factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
}


def test_every_model_source_plans(tmp_path, capsys):
    """Preset, bundled name, run directory, HF config.json and DeepSeek's inference config all plan; the
    inference config of the 671B model gives the bundled V3's plan without its MTP module."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "config_671B.json").write_text(json.dumps(CONFIG_671B))
    from nanoseek.config import preset
    preset("tiny").save(tmp_path / "run")
    lo = Layout(pp=16, ep=64, schedule="dualpipe", global_batch=15360, precision="fp8", recompute="selective",
                activations="v3", mtp=False)
    ours = plan_training(str(tmp_path / "ds" / "config_671B.json"), H800, lo)
    bundled = plan_training("deepseek-v3", H800, lo)
    assert ours["time"]["step_s"] == pytest.approx(bundled["time"]["step_s"])
    assert ours["memory"]["peak_bytes"] == pytest.approx(bundled["memory"]["peak_bytes"])
    for model in ("tiny", str(tmp_path / "run"), str(tmp_path / "run" / "config.json")):
        assert main(["plan", model, "--seq-len", "256", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["memory"]["fits"]
    assert main(["plan", "tiny", "--json"]) == 0  # without --seq-len: the model's 512, not 4096
    assert json.loads(capsys.readouterr().out)["layout"]["seq_len"] == 512
    assert main(["plan", "qwen2.5-72b", "--json"]) == 0  # 72B on 8 GPUs without sharding the weights: no
    assert not json.loads(capsys.readouterr().out)["memory"]["fits"]


def test_bubble_formulas():
    f, b, w, fb = 1.0, 2.0, 1.0, 3.0
    assert bubble("1f1b", 16, 2, f, b, w, fb) == 15 * 3
    assert bubble("interleaved_1f1b", 16, 2, f, b, w, fb) == 15 * 3 / 2
    assert bubble("zb1p", 16, 2, f, b, w, fb) == 15 * 1
    assert bubble("dualpipe", 16, 2, f, b, w, fb) == 7 * 2
    assert bubble("dualpipev", 8, 2, f, b, w, fb) == 7 * 2 / 2
    assert bubble("1f1b", 1, 2, f, b, w, fb) == 0


def test_splits_keep_every_layer_and_lighten_the_ends():
    counts = split_layers(61, 16)
    assert sum(counts) == 61 and max(counts) - min(counts) <= 1 and counts[0] <= counts[1]
    # balanced: the last chunk carries the head (cost 3) -> fewer layers there; the max is minimal
    best = balanced_layers((1.0,) * 10, 3, 0.0, 3.0)
    assert sum(best) == 10 and max(best[0], best[1], best[2] + 3) == 5
    bl = blocks("deepseek-v3", 4096)
    chunks = chunk_blocks(bl, 16, "balanced")
    assert sorted(i for c in chunks for i in c) == list(range(len(bl)))
    cost = [sum(bl[i].forward_flops for i in c) for c in chunks]
    even = [sum(bl[i].forward_flops for i in c) for c in chunk_blocks(bl, 16, "even")]
    assert max(cost) < max(even)


def test_v3_run_memory_time_and_what_ifs():
    rows = {r["model"].split(" (")[0].split(" instead")[0]: r for r in v3_plans()}
    pub = rows["published setup"]
    dual, one = pub["memory"]["per_device"], rows["1F1B"]["memory"]["per_device"]
    # DualPipe: each device holds a stage of each direction -> twice 1F1B's parameters on a middle device
    assert dual[5]["params_on_device"] == pytest.approx(2 * one[5]["params_on_device"], rel=0.01)
    assert dual[5]["micro_batches_held"] == 17
    assert one[0]["micro_batches_held"] == 16 and one[15]["micro_batches_held"] == 1
    # the ZeRO-1 optimizer shard is 1/128 (dense) and 1/2 (experts) of the full state
    assert pub["derived"]["dp"] == 128 and pub["derived"]["dp_shard"] == 2
    # node-limited routing: 4 of 8 nodes, 7/8 of them remote -> 3.5 copies over the network; no limit -> 7
    assert pub["time"]["all_to_all_per_token_per_moe_layer"]["network_copies"] == 3.5
    assert rows["no node limit"]["time"]["all_to_all_per_token_per_moe_layer"]["network_copies"] == 7
    # what the seeds argue: FP8 is faster than BF16 and DualPipe than 1F1B; the node limit saves time
    hours = {k: r["budget"]["gpu_hours"] for k, r in rows.items()}
    assert hours["published setup"] < hours["BF16"] and hours["published setup"] < hours["1F1B"]
    assert hours["published setup"] < hours["no node limit"] and hours["1F1B"] < hours["1F1B and no node limit"]
    assert pub["time"]["exposed_all_to_all_s"] == pytest.approx(0, abs=1e-9)
    assert rows["1F1B"]["time"]["bubble_s"] > 3 * pub["time"]["bubble_s"]
    # memory: the published setup fits an 80 GiB H800; the even split overloads the embedding/head device
    assert pub["memory"]["fits"] and not rows["layers split evenly"]["memory"]["fits"]
    assert not rows["BF16"]["memory"]["fits"]
    # a sanity band only (the number itself is reported in docs/plan.md, not tuned): same order as 2.664M
    assert 1e6 < hours["published setup"] < 5e6


def test_cluster_overrides():
    base = cluster("H800", 8)
    assert base.hbm_gb == 80 and base.nvlink_gb_s == 200 and base.gpus_per_node == 8
    lo = Layout(ep=8, global_batch=8, seq_len=4096)
    ref = plan_training("deepseek-v2-lite", base, lo, tokens=1e12)
    small = plan_training("deepseek-v2-lite", cluster("H800", 8, hbm_gb=24), lo)
    assert ref["memory"]["fits"] and not small["memory"]["fits"]
    fast = plan_training("deepseek-v2-lite", cluster("H800", 8, bf16_tflops=2 * 989.5), lo)
    assert fast["time"]["compute_s"] < ref["time"]["compute_s"]
    priced = plan_training("deepseek-v2-lite", cluster("H800", 8, usd_per_gpu_hour=3.0), lo, tokens=1e12)
    assert priced["budget"]["usd"] == pytest.approx(1.5 * ref["budget"]["usd"])
    assert "overridden: usd_per_gpu_hour" in priced["cluster"]["source"]


def test_zero_stages_shard_the_state():
    base = Layout(pp=1, ep=1, zero=0, global_batch=8, seq_len=1024)  # ep=8 would leave experts unreplicated
    cl = cluster("H100", 8)
    mem = {z: plan_training("deepseek-v2-lite", cl, replace(base, zero=z))["memory"]["per_device"][0] for z in range(4)}
    assert mem[1]["optimizer"] < mem[0]["optimizer"] / 7 and mem[1]["gradients"] == mem[0]["gradients"]
    assert mem[2]["gradients"] < mem[1]["gradients"] / 7 and mem[2]["weights"] == mem[1]["weights"]
    assert mem[3]["weights"] < mem[2]["weights"] / 7


def test_recompute_trades_memory_for_time():
    lo = Layout(pp=1, ep=8, global_batch=8, seq_len=4096)
    cl = cluster("H100", 8)
    r = {m: plan_training("deepseek-v2-lite", cl, replace(lo, recompute=m)) for m in ("none", "selective", "full")}
    act = {m: x["memory"]["per_device"][0]["activations"] for m, x in r.items()}
    step = {m: x["time"]["step_s"] for m, x in r.items()}
    assert act["full"] < act["selective"] < act["none"]
    assert step["none"] <= step["selective"] < step["full"]


def test_sweep_lists_feasible_layouts_fastest_first():
    s = sweep("deepseek-v2-lite", cluster("H100", 16), Layout(global_batch=64, seq_len=4096), top=50,
              schedules=("1f1b", "dualpipev"))
    steps = [r["time"]["step_s"] for r in s["top"]]
    assert s["feasible"] > 0 and steps == sorted(steps)
    assert all(r["memory"]["fits"] for r in s["top"])
    assert s["tried"] == s["invalid"] + s["do_not_fit"] + s["feasible"]


def test_serving_mla_against_dense_405b():
    h200 = cluster("H200", 8)
    v3 = plan_serving("deepseek-v3", h200, weight_dtype="fp8", kv_dtype="bf16", context=32768)
    llama = plan_serving("llama-3.1-405b", h200, weight_dtype="fp8", kv_dtype="bf16", context=32768)
    assert v3["kv_bytes_per_token"] == 70272 and llama["kv_bytes_per_token"] == 516096
    assert v3["replica_gpus"] == 8 and llama["replica_gpus"] == 4
    assert v3["requests_per_gpu"] > llama["requests_per_gpu"]
    fp8 = plan_serving("deepseek-v3", h200, weight_dtype="fp8", kv_dtype="fp8", context=32768)
    assert fp8["requests_per_gpu"] == pytest.approx(2 * v3["requests_per_gpu"], rel=0.01)
    # 671B + MTP (1,365 GB) in BF16 needs more than two H800 nodes (2 x 8 x 77 GB usable): three
    assert plan_serving("deepseek-v3", cluster("H800", 16), weight_dtype="bf16")["replica_gpus"] == 24


def test_cli_text_and_json(capsys):
    argv = ["plan", "deepseek-v3", "--gpu", "H800", "--gpus", "2048", "--pp", "16", "--ep", "64", "--schedule",
            "dualpipe", "--global-batch", "15360", "--precision", "fp8", "--recompute", "selective",
            "--comm-sms", "20", "--tokens", "14.8T", "--activations", "v3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in ("memory of the fullest GPU", "pipeline bubble", "GPU-hours", "assumptions:",
                 "at 50% of the dense peak"):
        assert text in out, text
    assert main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budget"]["usd"] == pytest.approx(2 * data["budget"]["gpu_hours"])
    assert len(data["assumptions"]) >= 10 and data["layout"]["schedule"] == "dualpipe"
    assert main(["plan", "deepseek-v2-lite", "--gpu", "H100", "--gpus", "16", "--ep", "8", "--precision", "bf16"]) == 0
    assert "MFU (bf16 peak)" in capsys.readouterr().out
    assert main(["plan", "deepseek-v3", "llama-3.1-405b", "--serve", "--gpu", "H200", "--json"]) == 0
    assert [r["kv_bytes_per_token"] for r in json.loads(capsys.readouterr().out)] == [70272, 516096]


@pytest.mark.parametrize("argv, message", [
    (["plan"], "name a model"),
    (["plan", "gpt-5"], "unknown model 'gpt-5'"),
    (["plan", "tiny", "--gpu", "Z80"], "unknown GPU"),
    (["plan", "tiny", "--gpus", "0"], "invalid setting `--gpus`"),
    (["plan", "tiny", "--gpus", "8", "--pp", "3"], "does not divide the 8 GPUs"),
    (["plan", "tiny", "--gpus", "8", "--ep", "3"], "does not divide the 8 routed experts"),
    (["plan", "tiny", "--gpus", "8", "--pp", "8"], "more stages than layers"),
    (["plan", "tiny", "--gpus", "4", "--pp", "2", "--global-batch", "2", "--seq-len", "256"],
     "1f1b with pp=2 needs at least 2 micro-batches"),
    (["plan", "tiny", "--schedule", "gpipe"], "invalid setting `--schedule` = 'gpipe'"),
    (["plan", "tiny", "--precision", "fp4"], "invalid setting `--precision`"),
    (["plan", "tiny", "--gpu", "A100", "--precision", "fp8", "--seq-len", "256"], "no fp8 peak"),
    (["plan", "tiny", "--gemm-efficiency", "1.5"], "invalid setting `--gemm-efficiency`"),
    (["plan", "tiny", "--tokens", "lots"], "invalid setting `--tokens`"),
    (["plan", "tiny", "--hbm-gb", "-1"], "invalid setting `--hbm-gb`"),
    (["plan", "tiny", "--fp8-tflops", "nan"], "invalid setting `--fp8-tflops`"),
    (["plan", "tiny", "--seq-len", "1024"], "exceeds the model's max_position_embeddings"),
    (["plan", "llama-3.1-405b", "--ep", "2"], "no routed experts"),
    (["plan", "tiny", "--global-batch", "3", "--gpus", "2"], "not a multiple"),
    (["plan", "tiny", "--sweep", "--serve"], "choose one of"),
    (["plan", "tiny", "--serve", "--kv-dtype", "int3"], "invalid setting `--kv-dtype`"),
    (["plan", "tiny", "--v3"], "name no model"),
    (["plan", "tiny", "--gpus", "8", "--pp", "3", "--schedule", "dualpipe"], "does not divide"),
    (["plan", "tiny", "--gpus", "6", "--pp", "3", "--schedule", "dualpipe"], "even --pp"),
    (["plan", "--calibrate", "--batch", "0"], "invalid setting `--batch`"),
    (["plan", "llama-3.1-405b", "--calibrate"], "trains a nanoseek (DeepSeek-V3 family) model"),
    (["plan", "tiny", "--split", "random"], "invalid setting `--split`"),
    (["plan", "tiny", "--gpus", "8", "--ep", "2", "--dp-shard", "2"], "pp 1 x dp_shard 2 x ep 2 = 4 is not the 8 GPUs"),
    (["plan", "deepseek-v3", "--calibrate"], "more than half of this machine"),
    (["plan", "tiny", "--validate"], "name no model"),
    (["plan", "--validate", "--v3"], "choose one of"),
    (["plan", "--validate", "--steps", "0"], "invalid setting `--steps`"),
])
def test_bad_input_is_one_error_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek plan: error: ") and err.count("\n") == 1, err
    assert message in err


def test_calibration_predicts_memory_of_a_real_training_step():
    """nanoseek's Trainer runs 2 steps in a fresh process; the planner's peak memory for that step must be
    within the issue's 15% of the measured peak RSS (docs/plan.md: -6% to -12% at these sizes)."""
    from nanoseek.config import preset
    from nanoseek.plan.calibrate import cpu_cluster, predict, run_steps

    config = preset("small").to_dict()
    measured = run_steps(config, batch=4, seq_len=256, steps=1)
    plan = predict(config, cpu_cluster(50e9, 10e9, None), 4, 256, "small")
    assert measured["peak_above_baseline"] > 150e6 and measured["step_s"] > 0
    error = plan["memory"]["peak_bytes"] / measured["peak_above_baseline"] - 1
    assert abs(error) <= 0.15, error


def test_calibration_measures_this_machine():
    """The machine measurements behind --calibrate, at tiny sizes: every GEMM kind of the model is timed,
    the FLOP-weighted rate lies between the slowest and the fastest, the copy bandwidth is positive."""
    from nanoseek.config import preset
    from nanoseek.plan.calibrate import measure_machine, model_gemms

    cfg = preset("tiny")
    shapes = model_gemms(cfg, 1, 32)
    assert {"routed experts", "attention core", "output head + loss", "MTP eh_proj"} <= set(shapes)
    fwd = cost.forward_flops_per_token(cfg, 32, include_mtp=True) * 32
    assert sum(f for _, f in shapes.values()) == pytest.approx(fwd, rel=0.02)  # only norms' weights differ
    m = measure_machine(cfg, 1, 32, collective=False)
    rates = m["gemm_flops_per_s"].values()
    assert min(rates) <= m["gemm_rate_used"] <= max(rates) and m["memory_bytes_per_s"] > 0
    assert 1e-8 < m["op_s"] < 1e-3


def _dispatched_ops(fn) -> int:
    from nanoseek.plan.machine import OpCounter

    with OpCounter() as counter:
        fn()
    return counter.ops


@pytest.mark.parametrize("over", [{}, {"q_lora_rank": None, "num_nextn_predict_layers": 0},
                                  {"n_shared_experts": 0, "n_group": 1, "topk_group": 1, "aux_loss_alpha": 0.0},
                                  {"num_hidden_layers": 4, "first_k_dense_replace": 2, "num_nextn_predict_layers": 2}])
def test_host_op_counts_match_the_ops_nanoseek_dispatches(one_thread, tmp_path, over):
    """The planner's op counts (nanoseek/plan/host.py, from the config alone) against the ops a real
    training step of that config dispatches (forward + backward per micro-batch; clipping, AdamW and the
    bias update per step), and its parameter tensors exactly."""
    import torch

    from nanoseek.config import ModelConfig, preset
    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.plan.calibrate import RandomTokens
    from nanoseek.plan.host import ops_per_micro_batch, ops_per_step, parameter_tensors
    from nanoseek.train.config import TrainerConfig
    from nanoseek.train.core import Trainer

    cfg = ModelConfig.from_dict({**preset("tiny").to_dict(), **over})
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    model.init_weights()
    trainer = Trainer(TrainerConfig(out_dir=str(tmp_path), device="cpu", dtype="float32", max_steps=5,
                                    warmup_steps=1, tensorboard=False), model, flops_per_token=1.0, tokens_per_step=32)
    source = RandomTokens(cfg.vocab_size, 2, 16)
    loss_fn = lambda m, ids: (m(ids, labels=ids).loss, {})  # noqa: E731
    trainer.train_step(source, loss_fn)
    ids = source.next_batch()
    micro = _dispatched_ops(lambda: model(ids, labels=ids).loss.backward())
    assert parameter_tensors(cfg) == len(list(model.parameters()))
    assert ops_per_micro_batch(cfg) == pytest.approx(micro, rel=0.02)
    step = _dispatched_ops(lambda: trainer.train_step(source, loss_fn))
    assert ops_per_step(cfg) == pytest.approx(step, rel=0.02)


def test_host_op_counts_follow_the_config():
    """Ops grow with layers and MTP modules, a MoE layer costs more than a dense one, and neither the
    number of experts, top-k, batch nor sequence length changes them (one grouped GEMM for the experts)."""
    from nanoseek.config import preset
    from nanoseek.plan.host import ops_per_micro_batch, ops_per_step

    tiny = preset("tiny").to_dict()
    deeper = [ops_per_micro_batch({**tiny, "num_hidden_layers": n}) for n in (2, 3, 4, 6)]
    assert deeper == sorted(deeper) and len(set(deeper)) == 4
    dense_first = ops_per_micro_batch({**tiny, "num_hidden_layers": 4, "first_k_dense_replace": 2})
    assert dense_first < deeper[2]
    assert ops_per_micro_batch({**tiny, "n_routed_experts": 64, "num_experts_per_tok": 6}) == deeper[1]
    assert ops_per_micro_batch(tiny, include_mtp=False) < ops_per_micro_batch(tiny)
    assert ops_per_step(tiny, n_micro=4) - ops_per_step(tiny) == 3 * ops_per_micro_batch(tiny)


def test_host_costs_only_on_a_calibrated_cpu():
    """A GPU cluster has no host costs (the V3 step is what it was); a CPU cluster with a per-op cost adds
    ops x cost, replaces the fused-AdamW time by torch's unfused loop, and no longer prices the tensors of
    the separately timed units (attention core, output head + loss) as memory traffic."""
    from nanoseek.config import preset
    from nanoseek.plan.calibrate import cpu_cluster, predict
    from nanoseek.plan.host import ADAMW_ACCESSES, CLIP_ACCESSES, ops_per_step

    v3 = plan_training("deepseek-v3", H800, Layout(pp=16, schedule="dualpipe", ep=64, zero=1, micro_batch=1,
                                                   global_batch=15360, seq_len=4096, precision="fp8",
                                                   recompute="selective", activations="v3"))
    assert v3["time"]["framework_s"] == 0 and H800.host is None
    config = preset("small").to_dict()
    bare = predict(config, replace(cpu_cluster(50e9, 20e9, None), host=None), 4, 256, "small")["time"]
    host = predict(config, cpu_cluster(50e9, 20e9, None, op_s=4e-6), 4, 256, "small")["time"]
    assert host["framework_ops"] == ops_per_step(config)
    assert host["framework_s"] == pytest.approx(ops_per_step(config) * 4e-6)
    params = cost.params(config)["params_total"] + cost.params(config)["params_mtp_total"]  # 4,284,832, MTP included
    assert host["optimizer_s"] == pytest.approx(params * 4 * (ADAMW_ACCESSES + CLIP_ACCESSES) / 20e9, rel=1e-6)
    assert host["optimizer_s"] > 2 * bare["optimizer_s"]
    assert host["memory_bound_s"] < bare["memory_bound_s"]  # logits, log-probs, T x T probabilities timed apart
    assert host["compute_s"] - host["memory_bound_s"] == pytest.approx(bare["compute_s"] - bare["memory_bound_s"])
