"""FP8 training in DeepSeek-V3's recipe (nanoseek.fp8): quantisation, the block-scaled GEMM, the FP8
linear and grouped GEMM with their gradients, models and training with fp8=true, BF16 AdamW moments,
FP8 checkpoint export, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import preset
from nanoseek.errors import SettingError
from nanoseek.fp8 import (FP8, FP8_MAX, FP8Linear, dequantize_blocks, dequantize_tiles, fp8_grouped_mm,
                          fp8_model_build, fp8_modules, fp8_unsupported, quantize_blocks, quantize_tiles)
from nanoseek.fp8.gemm import reference_gemm, scaled_gemm
from nanoseek.fp8.linear import FP8LinearFunction
from nanoseek.fp8.optim import AdamW
from nanoseek.fp8.quantize import block_scales_per_row
from nanoseek.model import DeepseekV3ForCausalLM


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------- quantise
def test_tile_scales_have_one_value_per_token_and_128_channels():
    torch.manual_seed(0)
    x = torch.randn(3, 300)
    x[1, 256:] *= 50  # the partial last tile (44 channels) of row 1 has its own, larger scale
    x[2, 128:256] = 0  # an all-zero tile
    q, s = quantize_tiles(x)
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == (3, 3) and s.dtype == torch.float32
    for r in range(3):
        for k, cols in enumerate((slice(0, 128), slice(128, 256), slice(256, 300))):
            assert s[r, k] == pytest.approx(max(x[r, cols].abs().max().item(), 1e-12) / FP8_MAX, rel=1e-6)
    assert s[1, 2] > 20 * s[1, 1]
    assert torch.all(q[2, 128:256].float() == 0)
    # the largest value of every tile lands on E4M3's largest finite value
    assert q.float().abs().amax(1).tolist() == [FP8_MAX] * 3


def test_block_scales_cover_128_by_128_with_partial_edge_blocks():
    torch.manual_seed(0)
    w = torch.randn(200, 130)
    w[150, 129] = 30.0  # lives in the corner block (72 x 2 elements)
    q, s = quantize_blocks(w)
    assert q.shape == (200, 130) and s.shape == (2, 2)
    for i, rows in enumerate((slice(0, 128), slice(128, 200))):
        for j, cols in enumerate((slice(0, 128), slice(128, 130))):
            assert s[i, j] == pytest.approx(w[rows, cols].abs().max().item() / FP8_MAX, rel=1e-6)
    assert s[1, 1] == pytest.approx(30.0 / FP8_MAX)
    assert q[150, 129].float() == FP8_MAX
    # batched (routed experts [E, N, K]): each expert's blocks are its own
    qb, sb = quantize_blocks(torch.stack([w, 2 * w]))
    assert sb.shape == (2, 2, 2) and torch.allclose(sb[1], 2 * s) and torch.equal(qb[0], q)


@pytest.mark.parametrize("shape", [(5, 128), (4, 300), (1, 7)])
def test_quantise_dequantise_round_trip_is_within_e4m3_rounding(shape):
    torch.manual_seed(1)
    x = torch.randn(*shape) * torch.logspace(-3, 2, shape[1])  # values over five decades
    q, s = quantize_tiles(x)
    back = dequantize_tiles(q, s)
    scale = s.repeat_interleave(128, 1)[:, :shape[1]]
    # round to nearest with 3 mantissa bits: relative error <= 2^-4 for normals, absolute
    # <= half the smallest subnormal (2^-10) times the scale below them
    bound = torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6)
    assert torch.all((back - x).abs() <= bound)
    w = torch.randn(shape[1], shape[0] + 130)
    qw, sw = quantize_blocks(w)
    back_w = dequantize_blocks(qw, sw)
    assert torch.all((back_w - w).abs() <= torch.maximum(w.abs() * 2.0**-4, block_scales_per_row(sw, w.shape[0])
                                                          .repeat_interleave(128, 1)[:, :w.shape[1]] * 2.0**-10) + 1e-9)


def test_blocks_read_back_with_the_checkpoint_loader():
    from nanoseek.model.state_dict_adapter import dequantize_fp8_blocks

    q, s = quantize_blocks(torch.randn(200, 300))
    assert torch.equal(dequantize_fp8_blocks(q, s), dequantize_blocks(q, s))


# ---------------------------------------------------------------------------------------------- GEMM
@pytest.mark.parametrize("M,K,N", [(37, 300, 200), (8, 64, 16), (130, 256, 5)])
def test_fp8_gemm_equals_float64_of_the_same_quantised_math(M, K, N):
    torch.manual_seed(2)
    x, w = torch.randn(M, K), torch.randn(N, K)
    xq, xs = quantize_tiles(x)
    wq, ws = quantize_blocks(w)
    ws_rows = block_scales_per_row(ws, N)
    out = scaled_gemm(xq, xs, wq, ws_rows)
    ref = reference_gemm(xq, xs, wq, ws_rows)
    magnitude = dequantize_tiles(xq, xs).abs().double() @ dequantize_blocks(wq, ws).abs().double().t()
    assert out.dtype == torch.float32
    assert torch.all((out.double() - ref).abs() <= 1e-6 * magnitude + 1e-30)  # fp32 accumulation only
    # and it really is FP8: the quantisation error against the unquantised product is there (E4M3: ~3%)
    assert 5e-3 < rel(out, x.double() @ w.double().t()) < 0.1


def test_gemm_names_operands_that_do_not_fit():
    a, s = quantize_tiles(torch.randn(4, 200))
    with pytest.raises(ValueError, match=r"\[4, 200\] x \[3, 100\]"):
        scaled_gemm(a, s, *quantize_tiles(torch.randn(3, 100)))
    with pytest.raises(ValueError, match=r"\(5,\)"):
        quantize_blocks(torch.randn(5))
    with pytest.raises(ValueError, match=r"rows \(6, 8\), weights \(2, 9, 4\)"):
        fp8_grouped_mm(torch.randn(6, 8), torch.randn(2, 9, 4), torch.tensor([3, 6], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------- linear
def test_fp8_linear_gradients():
    """Fprop/Dgrad/Wgrad against float64 of the same quantised math (tight) and against autograd of the
    dequantised forward (loose: backward quantises dy, and x along tokens, on top)."""
    torch.manual_seed(3)
    M, K, N = 150, 200, 136  # partial tiles along tokens, in and out features
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    dy = torch.randn(M, N)
    y = FP8LinearFunction.apply(x, w, torch.float32)
    y.backward(dy)

    xq, xs = quantize_tiles(x.detach())
    wq, ws = quantize_blocks(w.detach())
    xd, wd = dequantize_tiles(xq, xs).double(), dequantize_blocks(wq, ws).double()
    dyq, dys = quantize_tiles(dy)  # Dgrad: 1 x 128 tiles along out_features
    dyt_q, dyt_s = quantize_tiles(dy.t())  # Wgrad: tiles of 128 tokens
    xt_q, xt_s = quantize_tiles(xd.float().t())
    exact = {"y": xd @ wd.t(), "dx": dequantize_tiles(dyq, dys).double() @ wd,
             "dw": dequantize_tiles(dyt_q, dyt_s).double() @ dequantize_tiles(xt_q, xt_s).double().t()}
    for name, got in (("y", y), ("dx", x.grad), ("dw", w.grad)):
        assert rel(got, exact[name]) < 1e-6, name

    xa, wa = xd.clone().requires_grad_(), wd.clone().requires_grad_()
    (xa @ wa.t()).backward(dy.double())
    assert rel(x.grad, xa.grad) < 0.08 and rel(w.grad, wa.grad) < 0.08
    assert rel(x.grad, xa.grad) > 1e-3  # dy really went through FP8


def test_fp8_linear_saves_its_input_in_fp8():
    torch.manual_seed(4)
    layer = FP8Linear(256, 256, bias=False)
    x = torch.randn(512, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert {t.dtype for t in saved} == {FP8, torch.float32}
    assert any(t.dtype == FP8 and t.shape == x.shape for t in saved)
    fp32_bytes = sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.float32)
    assert fp32_bytes <= 4 * (512 * 2 + 4)  # only the scales: 2 per token, 2 x 2 blocks


def test_fp8_linear_under_autocast_and_bias():
    torch.manual_seed(5)
    layer = FP8Linear(64, 32, bias=True)
    x = torch.randn(2, 5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 32)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32
    assert rel(y.float(), F.linear(x, layer.weight, layer.bias).detach()) < 0.08


def test_fp8_grouped_gemm_is_the_fp8_linear_per_expert():
    torch.manual_seed(6)
    x = torch.randn(20, 64, requires_grad=True)
    w = torch.randn(4, 64, 48, requires_grad=True)  # [E, in, out] as moe passes it
    offsets = torch.tensor([5, 5, 12, 20], dtype=torch.int32)  # expert 1 gets no rows
    y = fp8_grouped_mm(x, w, offsets)
    dy = torch.randn_like(y)
    y.backward(dy)
    for e, (s, t) in enumerate(((0, 5), (5, 5), (5, 12), (12, 20))):
        xe = x.detach()[s:t].clone().requires_grad_()
        we = w.detach()[e].t().contiguous().requires_grad_()
        if t > s:
            ye = FP8LinearFunction.apply(xe, we, torch.float32)
            ye.backward(dy[s:t])
            assert torch.equal(y[s:t], ye)
            assert torch.allclose(x.grad[s:t], xe.grad) and torch.allclose(w.grad[e], we.grad.t())
        else:
            assert torch.all(w.grad[e] == 0)
    ref = F.grouped_mm(x.detach(), w.detach(), offs=offsets)
    assert rel(y, ref) < 0.08


# ---------------------------------------------------------------------------------------------- model
def tiny():
    return preset("tiny", intermediate_size=200, moe_intermediate_size=136)  # dims that are not 128-multiples


def test_fp8_model_swaps_projections_and_experts_only():
    torch.manual_seed(7)
    plain = DeepseekV3ForCausalLM(tiny())
    with fp8_model_build():
        model = DeepseekV3ForCausalLM(tiny())
    assert fp8_modules(plain) == {"linear": 0, "experts": 0}
    counts = fp8_modules(model)
    n_linear = sum(isinstance(m, nn.Linear) for m in plain.modules())
    assert counts == {"linear": n_linear - 1, "experts": 3}  # all but the head; 2 MoE layers + the MTP block
    assert type(model.lm_head) is nn.Linear and model.mtp[0].eh_proj.__class__ is FP8Linear
    assert type(model.model.layers[1].mlp.gate.weight) is nn.Parameter  # router gate untouched
    assert fp8_modules(DeepseekV3ForCausalLM(tiny()))["linear"] == 0  # the factories are restored
    model.load_state_dict(plain.state_dict())  # same parameters, same names
    x = torch.randint(0, 512, (2, 40))
    loss, loss8 = plain(x, labels=x).loss, model(x, labels=x).loss
    assert loss8.item() == pytest.approx(loss.item(), rel=0.01) and loss8.item() != loss.item()
    loss8.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():  # decoding one token goes through the FP8 expert path one expert at a time
        assert model.model.layers[1].mlp.few_tokens(torch.zeros(1, 64))
        out = model(x[:1, :1]).logits
    assert torch.isfinite(out).all()


class Batches:
    def __init__(self, seed: int, vocab: int = 64, T: int = 32):
        self.g = torch.Generator().manual_seed(seed)
        self.vocab, self.T = vocab, T

    def next_batch(self):  # a learnable sequence: every token is the previous + 1 (mod vocab)
        start = torch.randint(0, self.vocab, (4, 1), generator=self.g)
        return (start + torch.arange(self.T)) % self.vocab

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def train(tmp_path, **kw):
    from nanoseek.train.config import LanguageModelingConfig
    from nanoseek.train.core import Trainer, seed_everything
    from nanoseek.train.pretrain import build_model, lm_loss_fn

    settings = dict(model="tiny", model_overrides={"vocab_size": 64, "num_hidden_layers": 2},
                    out_dir=str(tmp_path / "run"), max_steps=30, lr=3e-3, warmup_steps=3, eval_every=0,
                    save_every=0, tensorboard=False, seq_len=32, batch_size=4)
    cfg = LanguageModelingConfig(**{**settings, **kw})
    seed_everything(0)
    model = build_model(cfg, 64)
    trainer = Trainer(cfg, model, 1.0, 128)
    trainer.fit(Batches(0), lm_loss_fn(cfg, trainer))
    losses = [row["lm_loss"] for row in trainer.history]
    return model, losses, trainer


def test_short_fp8_training_tracks_the_bf16_run(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_NO_PROGRESS", "1")
    _, bf16, _ = train(tmp_path / "bf16", dtype="bfloat16")
    model, fp8, trainer = train(tmp_path / "fp8", dtype="bfloat16", fp8=True, adam_moments="bfloat16")
    assert fp8_modules(model)["linear"] > 0
    assert isinstance(trainer.optimizer, AdamW)
    assert trainer.optimizer.state[model.lm_head.weight]["exp_avg"].dtype == torch.bfloat16
    assert fp8[-1] < 0.8 * fp8[0]  # it learns
    tail = lambda losses: sum(losses[-5:]) / 5  # noqa: E731
    assert abs(tail(fp8) - tail(bf16)) / tail(bf16) < 0.1  # loose; the 0.25% claim is benchmarks/fp8.py's
    assert fp8 != bf16
    # the exported model is a plain one (fp32 master weights)
    from nanoseek.hf import from_pretrained
    assert fp8_modules(from_pretrained(tmp_path / "fp8" / "run" / "model"))["linear"] == 0


def test_compiled_fp8_training_equals_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_NO_PROGRESS", "1")
    _, eager, _ = train(tmp_path / "eager", fp8=True, max_steps=4)
    _, compiled, _ = train(tmp_path / "compiled", fp8=True, compile=True, max_steps=4)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-6)  # the same weights: the same forward
    # later steps: fused fp32 ops differ from eager in the last bits, and an FP8 rounding that flips on
    # such a difference moves the loss by ~1e-4 relative (measured 7e-5 at step 4)
    assert compiled == pytest.approx(eager, rel=1e-3)

def test_trainer_exports_the_final_model_in_fp8_when_asked(tmp_path, monkeypatch):
    from nanoseek.hf import from_pretrained

    monkeypatch.setenv("NANOSEEK_NO_PROGRESS", "1")
    model, _, trainer = train(tmp_path, fp8=True, export_fp8=True, max_steps=2)
    final = trainer.out_dir / "model"
    config = json.loads((final / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    back = from_pretrained(final).state_dict()
    trained = model.state_dict()
    name = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(back[name], trained[name])  # rounded to FP8 blocks ...
    assert torch.equal(back[name], dequantize_blocks(*quantize_blocks(trained[name])))  # ... exactly so
    assert torch.equal(back["lm_head.weight"], trained["lm_head.weight"])


# ---------------------------------------------------------------------------------------------- AdamW
def test_adamw_bf16_moments():
    torch.manual_seed(8)
    start = torch.randn(50, 20)
    params = [nn.Parameter(start.clone()) for _ in range(3)]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opts = [torch.optim.AdamW([params[0]], **kw), AdamW([params[1]], moment_dtype=torch.float32, **kw),
            AdamW([params[2]], **kw)]
    for _ in range(20):
        g = torch.randn(50, 20)
        for p, opt in zip(params, opts):
            p.grad = g.clone()
            opt.step()
    assert torch.allclose(params[0], params[1], atol=1e-7)  # fp32 moments = torch's AdamW
    state = opts[2].state[params[2]]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    assert 0 < (params[2] - params[0]).abs().max() < 5e-3  # BF16 moments: close, not equal
    resumed = AdamW([params[2]], **kw)
    resumed.load_state_dict(opts[2].state_dict())  # torch casts moments to fp32 on load
    params[2].grad = torch.randn(50, 20)
    resumed.step()
    assert resumed.state[params[2]]["exp_avg"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- checkpoints
def test_fp8_checkpoint_export_round_trip(tmp_path):
    from safetensors import safe_open

    from nanoseek.hf import from_pretrained, save_pretrained

    torch.manual_seed(9)
    model = DeepseekV3ForCausalLM(tiny())
    save_pretrained(model, tmp_path, fp8=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    gate = stored["model.layers.0.mlp.gate_proj.weight"]  # [200, 64]: a partial second block row
    assert gate.dtype == FP8 and stored["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)
    assert stored["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"].shape == (1, 2)  # [64, 136]
    assert stored["model.layers.3.eh_proj.weight"].dtype == FP8  # the MTP module's projection
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.norm.weight", "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert stored[kept].dtype == torch.float32 and kept + "_scale_inv" not in stored
    back = from_pretrained(tmp_path)
    state = back.state_dict()
    fp8_round = lambda t: dequantize_blocks(*quantize_blocks(t))  # noqa: E731
    for name, t in model.state_dict().items():
        if name.endswith("_proj.weight") or name.endswith("experts.down_proj"):  # experts: per expert [E, ...]
            assert torch.equal(state[name], fp8_round(t)), name
        elif name.endswith("experts.gate_up_proj"):  # stored as separate gate and up projections
            assert torch.equal(state[name], torch.cat([fp8_round(half) for half in t.chunk(2, dim=1)], dim=1))
        else:
            assert torch.equal(state[name], t), name


# ---------------------------------------------------------------------------------------------- bad input
def test_fp8_without_float8_gemms_is_one_setting_error(monkeypatch):
    from nanoseek.train.config import PretrainConfig, load_train_config

    def no_fp8(*args, **kwargs):
        raise RuntimeError("_scaled_mm is not implemented for this device\nmore lines")

    monkeypatch.setattr(torch, "_scaled_mm", no_fp8)
    assert "does not run on cpu (_scaled_mm is not implemented" in fp8_unsupported(torch.device("cpu"))
    with pytest.raises(SettingError) as err:
        load_train_config(PretrainConfig, None, ["fp8=true", "device=cpu"])
    assert str(err.value).startswith("invalid setting `fp8` = True: FP8 training needs float8 GEMMs")
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    assert fp8_unsupported(torch.device("cpu")) is None
    assert "not mps" in fp8_unsupported(torch.device("mps"))
    with pytest.raises(SettingError, match="adam_moments"):
        load_train_config(PretrainConfig, None, ["adam_moments=fp16"])


def test_expert_parallel_runs_the_fp8_experts(tmp_path, monkeypatch):
    """Under EP (one gloo rank here) the routed experts still go through the FP8 grouped GEMM, with the
    same result as the local path."""

    import nanoseek.fp8.grouped as grouped
    from nanoseek.parallel.expert_parallel import ExpertParallel

    torch.manual_seed(10)
    with fp8_model_build():
        moe = DeepseekV3ForCausalLM(tiny()).model.layers[1].mlp
    x = torch.randn(2, 24, 64)
    local = moe(x)
    calls = []
    real = grouped.FP8GroupedMMFunction.apply
    monkeypatch.setattr(grouped.FP8GroupedMMFunction, "apply", lambda *a: calls.append(1) or real(*a))
    from nanoseek.parallel.config import ParallelConfig
    from nanoseek.parallel.mesh import init_parallel

    ctx = init_parallel(ParallelConfig(), torch.device("cpu"))  # the 1-rank group of a single process
    moe.expert_dispatcher = ExpertParallel(ctx.mesh.get_group("ep"), moe.cfg.n_routed_experts)
    parallel = moe(x)
    assert len(calls) == 2  # gate_up and down
    assert torch.allclose(parallel, local, atol=1e-6)


def test_sft_and_grpo_train_with_fp8(tmp_path, monkeypatch):
    """The R1 recipes build their model with build_model, so fp8=true reaches them too."""
    import math

    from nanoseek.data import synthetic_corpus, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.hf import save_pretrained
    from nanoseek.r1.configs import GRPOConfig, SFTConfig
    from nanoseek.r1.grpo import run_grpo
    from nanoseek.r1.sft import run_sft

    monkeypatch.setenv("NANOSEEK_NO_PROGRESS", "1")
    corpus = write_corpus(synthetic_corpus(100, seed=0) + ["Q: 3+4\n<think>3+4=7</think><answer>7</answer>"] * 10,
                          tmp_path / "c.jsonl")
    tok = train_tokenizer([corpus], 300, tmp_path / "tok", progress=False)
    torch.manual_seed(0)
    save_pretrained(DeepseekV3ForCausalLM(preset("tiny", vocab_size=320, max_position_embeddings=128)),
                    tmp_path / "model")
    tok.save(tmp_path / "model")
    model = str(tmp_path / "model")
    rows = [{"prompt": f"Q: {a}+{b}\n<think>", "completion": f"{a}+{b}={a + b}</think><answer>{a + b}</answer>"}
            for a in range(1, 5) for b in range(1, 4)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(model=model, init_from=model, max_steps=3, tensorboard=False, fp8=True, adam_moments="bfloat16")
    sft = run_sft(SFTConfig(data=str(tmp_path / "sft.jsonl"), out_dir=str(tmp_path / "sft"), seq_len=64,
                            batch_size=2, lr=3e-3, warmup_steps=1, save_every=0, eval_every=0, val_fraction=0.2,
                            dtype="bfloat16", **common))
    grpo = run_grpo(GRPOConfig(out_dir=str(tmp_path / "grpo"), task="arithmetic", n_train=20, n_test=10,
                               group_size=4, prompts_per_step=2, max_new_tokens=8, lr=1e-3, mu=2, beta=0.01,
                               eval_every=0, eval_problems=4, save_every=0, **common))
    for trainer in (sft, grpo):
        assert fp8_modules(trainer.model) == {"linear": 33, "experts": 3}
        assert all(math.isfinite(row["loss"]) for row in trainer.history)
        assert isinstance(trainer.optimizer, AdamW)
