"""SFT and GRPO on several processes: one step with data parallelism equals one process on the same global
batch (SFT) or the same groups (GRPO, every loss variant); a torchrun GRPO run resumes exactly and exports;
a one-process torchrun job (a 1-rank mesh, the multi-process code path) equals a plain run.

Every launch runs CPU processes with gloo and one thread each under a hard deadline (tests/parallel_launch.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parallel_launch import launch, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny model with a small tokenizer that knows the R1 tags."""
    from nanoseek.config import preset
    from nanoseek.data import synthetic_corpus, write_corpus
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.hf import save_pretrained
    from nanoseek.model import DeepseekV3ForCausalLM

    root = tmp_path_factory.mktemp("r1dp")
    corpus = write_corpus(synthetic_corpus(100, seed=0) +
                          ["Q: 3+4\n<think>3+4=7</think><answer>7</answer>"] * 10, root / "c.jsonl")
    tok = train_tokenizer([corpus], 300, root / "tok", progress=False)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(preset("tiny", vocab_size=320, max_position_embeddings=128, num_hidden_layers=2))
    save_pretrained(model, root / "model")
    tok.save(root / "model")
    return root / "model"


def ok(results) -> None:
    for rc, log in results:
        assert rc == 0, log[-3000:]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def test_one_step_equals_one_process(model_dir, tmp_path):
    ok(launch(["tests/parallel_worker.py", str(tmp_path), "recipes", str(model_dir)], 2, timeout=120))
    r = json.loads((tmp_path / "recipes.json").read_text())
    sft = r["sft"]
    assert sft["loss_diff"] < 1e-5 and sft["grad_diff"] < 1e-5, sft
    # the ranks' targets are uneven, so a mean of per-rank means would be wrong: the check can fail
    assert sft["targets"][0] not in (0, sft["targets"][1] / 2) and sft["mean_of_means_diff"] > 1e-3, sft
    for variant in ("grpo", "dr_grpo", "dapo", "gspo"):
        g = r[variant]
        assert g["loss_diff"] < 1e-5 and g["grad_diff"] < 1e-5 and g["norm_diff"] < 1e-5, (variant, g)
        assert g["grad_norm"] > 1e-3, (variant, g)  # a real step (the loss itself is ~0 at ratio 1)
        # what the trainer logs (averaged over micro-batches and ranks): the one-process values
        slow = {k: d for k, d in g["metric_diffs"].items() if d > 1e-5 and k not in ("rollout_s", "gen_tokens_per_s")}
        assert not slow and {"reward", "entropy", "clip_frac", "ratio", "kl", "logp_gap_mean", "logp_gap_max"} <= \
            g["metric_diffs"].keys(), (variant, g)


GRPO = ["n_train=16", "n_test=4", "group_size=2",
        "prompts_per_step=4", "max_new_tokens=6", "mu=2", "grad_accum=1", "beta=0.01", "lr=1e-3",
        "eval_every=2", "eval_problems=2", "sample_every=2", "show_samples=2", "save_every=1", "tensorboard=false",
        "parallel.timeout_s=60"]


def grpo_args(model_dir, out, *extra) -> list[str]:
    return ["-m", "nanoseek", "grpo", "--task", "arithmetic", "--model", str(model_dir), *GRPO, f"out_dir={out}", *extra]


def test_torchrun_grpo_resumes_exactly_and_exports(model_dir, tmp_path):
    """4 steps under torchrun; the same run stopped at step 3 (inside a rollout batch: mu=2) and resumed."""
    straight = tmp_path / "straight"
    log = torchrun(grpo_args(model_dir, straight, "max_steps=4", "parallel.dp_shard=2"), 2)
    assert log.count("done: step 4") == 1  # the summary comes from rank 0 only
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("reward" in r and "test_accuracy" in r for r in rows[1::2])
    assert len((straight / "samples.jsonl").read_text().splitlines()) == 2 * 2  # rank 0's table, steps 2 and 4
    assert (straight / "diagnostics.json").is_file()

    import nanoseek

    model = nanoseek.from_pretrained(straight / "model")  # exported from the shards
    assert model(torch.tensor([[5, 6, 7]])).logits.isfinite().all()

    resumed = tmp_path / "resumed"
    ok(launch(grpo_args(model_dir, resumed, "max_steps=3", "parallel.dp_shard=2"), 2, timeout=90))
    ok(launch([*grpo_args(model_dir, resumed, "max_steps=4", "parallel.dp_shard=2"), "--resume"], 2, timeout=90))
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: each rank's rollout stream was restored


def test_one_process_torchrun_is_the_plain_run(model_dir, tmp_path, monkeypatch):
    """WORLD_SIZE=1 (torchrun --nproc-per-node 1) and `python -m nanoseek sft` without torchrun both train on a
    1-rank mesh (torchrun's env:// group, or an in-memory one) and write the same DCP checkpoints: the same
    numbers."""
    from nanoseek.r1.configs import SFTConfig
    from nanoseek.r1.sft import run_sft

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}\n", "completion": f"<think>{i}+{i}</think>"
                                        f"<answer>{2 * i}</answer>"}) + "\n" for i in range(12)))
    settings = ["seq_len=64", "batch_size=4", "max_steps=3", "lr=1e-3", "eval_every=0", "save_every=2",
                "tensorboard=false"]
    mesh = tmp_path / "mesh"
    ok(launch(["-m", "nanoseek", "sft", "--model", str(model_dir), "--data", str(data), f"out_dir={mesh}",
               *settings], 1, timeout=90))
    plain = tmp_path / "plain"
    cfg = SFTConfig(model=str(model_dir), init_from=str(model_dir), data=str(data), out_dir=str(plain),
                    seq_len=64, batch_size=4, max_steps=3, lr=1e-3, eval_every=0, save_every=2, tensorboard=False)
    monkeypatch.setenv("NANOSEEK_NO_PROGRESS", "1")
    run_sft(cfg)
    for out in (mesh, plain):  # one code path: the same checkpoint format
        assert (out / "checkpoints" / "step_00000002" / "dcp" / ".metadata").is_file()
    losses = [[json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
              for out in (mesh, plain)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    a, b = weights(mesh), weights(plain)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.parametrize("setting, message", [
    ("prompts_per_step=3", "`prompts_per_step` = 3: must be a multiple of the data-parallel ranks (2"),
    ("grad_accum=4", "`grad_accum` = 4: must be <= the sequences of one data-parallel rank (1 prompts x 2)"),
    ("parallel.pp=2", "`parallel.pp` = 2: must be 1"),
])
def test_grpo_layouts_are_checked_before_any_process_group(model_dir, monkeypatch, setting, message):
    from nanoseek.errors import SettingError
    from nanoseek.r1.configs import GRPOConfig
    from nanoseek.r1.grpo import run_grpo
    from nanoseek.train.config import load_train_config

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    monkeypatch.setattr("nanoseek.parallel.runtime.init_parallel", no_process_group)
    layout = ["parallel.dp_shard=1"] if setting.startswith("parallel.pp") else ["parallel.dp_shard=2"]
    with pytest.raises(SettingError, match=re.escape(message)):
        cfg = load_train_config(GRPOConfig, None, [f"model={model_dir}", f"init_from={model_dir}", "group_size=2",
                                                   "prompts_per_step=2", *layout, setting])
        run_grpo(cfg)


def no_process_group(*args, **kwargs):
    raise AssertionError("a process group was asked for before the settings were checked")


def test_each_rank_rolls_out_its_own_prompts_with_its_own_seeds(monkeypatch):
    """Ranks 0 and 1 of 2 split every rollout batch's prompts between them (disjoint; together the prompts
    one process would draw) and sample with different seeds; rank 0 keeps the one-process seeds."""
    from types import SimpleNamespace

    import nanoseek.r1.grpo_batches as grpo_batches
    from nanoseek.r1.configs import GRPOConfig
    from nanoseek.r1.tasks import get_task

    calls = []
    monkeypatch.setattr(grpo_batches, "rollout", lambda model, tok, task, problems, seed, **kw:
                        calls.append(([id(p) for p in problems], seed)))
    task = get_task("arithmetic", n_train=10, n_test=2)
    cfg = GRPOConfig(prompts_per_step=4, group_size=2)
    trainer = SimpleNamespace(model=None)
    sources = [grpo_batches.RolloutSource(cfg, trainer, None, task, ranks=SimpleNamespace(rank=r, size=n))
               for r, n in ((0, 1), (0, 2), (1, 2))]
    for rollouts in range(4):  # crosses an epoch (10 prompts)
        calls.clear()
        for s in sources:
            s.rollouts = rollouts
            s.sample_groups(0)
        (whole, seed), (first, seed0), (second, seed1) = calls
        assert first + second == whole and not set(first) & set(second) and len(first) == 2
        assert seed0 == seed and seed1 != seed
