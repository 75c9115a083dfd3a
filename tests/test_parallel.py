"""Multi-process training (nanoseek.parallel): layouts give one process's numbers, EP dispatch is exact,
node-limited routing bounds the nodes per token, bad layouts fail before any process group.

The multi-process checks start 2 and 4 CPU processes with gloo (tests/parallel_launch.py: hard deadline,
one thread each); each launch runs several layouts and writes their differences, which the tests read."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.config import preset
from nanoseek.errors import SettingError
from nanoseek.model.router import route
from nanoseek.parallel.config import ParallelConfig
from nanoseek.parallel.traffic import nodes_per_token, split_by_place
from parallel_launch import launch

TINY = preset("tiny")  # 8 routed experts, n_group=2, topk_group=1


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("settings_, world, message", [
    (dict(dp_shard=2, ep=2), 2, r"2 x 2 = 4, but 2 process\(es\) were started"),
    (dict(ep=3), 3, r"`parallel.ep` = 3: must be a divisor of the routed experts \(8\)"),
    (dict(pp=2, schedule="zbv"), 2, r"`parallel.pp` = 2: must be at most 1: zbv cuts the model into 2 x pp stages"),
    (dict(ep=2, nodes=3), 2, r"`parallel.nodes` = 3: must be a divisor of the world size 2"),
    (dict(ep=2, node_limited=True), 2, r"node_limited needs an EP group spanning >= 2 nodes"),
    (dict(ep=4, nodes=4, node_limited=True), 4, r"set model.n_group=4 \(the EP group spans 4 nodes\), got n_group=2"),
    (dict(dp_shard=0), 1, r"`parallel.dp_shard` = 0: must be an integer >= 1"),
    (dict(backend="mpi"), 1, r"`parallel.backend` = 'mpi': must be auto, gloo or nccl"),
    (dict(backend="nccl", ep=2), 2, r"'nccl' needs CUDA devices"),
    (dict(dp_shard=2, ep=2, nodes=4), 4, None),  # fine: one rank per node, EP spans 2 nodes
])
def test_inconsistent_layouts_are_one_error(settings_, world, message):
    cfg = ParallelConfig(**settings_)
    if message is None:
        cfg.validate(TINY, world)
        return
    with pytest.raises(SettingError, match=message):
        cfg.validate(TINY, world)


def test_node_limited_layout_that_fits():
    cfg = ParallelConfig(ep=2, nodes=2, node_limited=True)
    cfg.validate(TINY, 2)
    assert (cfg.ranks_per_node, cfg.ep_nodes) == (1, 2)


# ---------------------------------------------------------------------------------------------- node limit
@settings(max_examples=60, deadline=None)
@given(nodes=st.sampled_from([2, 4, 8]), per_node=st.sampled_from([2, 4]), m=st.integers(1, 8),
       top_k=st.integers(1, 8), seed=st.integers(0, 2**16), adversarial=st.booleans())
def test_tokens_reach_at_most_m_nodes(nodes, per_node, m, top_k, seed, adversarial):
    """With n_group = nodes and topk_group = M, group-limited routing puts each token's experts on at most
    M nodes: on random scores, and on adversarial ones where every node holds one of the best experts and
    the balancing bias pulls towards the other nodes."""
    m = min(m, nodes)
    top_k = min(top_k, m * per_node)
    n_experts = nodes * per_node
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(32, n_experts, generator=g)
    bias = torch.randn(n_experts, generator=g) * 0.1
    if adversarial:  # the top-k by score alone would spread over every node
        scores.view(32, nodes, per_node)[:, :, 0] = 0.99
        bias = torch.linspace(1, -1, n_experts)
    idx = route(scores, bias, top_k, nodes, m, group_by_top2=True)
    assert int(nodes_per_token(idx, per_node).max()) <= m
    assert idx.unique(dim=1).shape[1] == top_k  # top_k distinct experts each


def test_nodes_per_token_counts_distinct_nodes():
    idx = torch.tensor([[0, 1, 2, 3], [0, 4, 8, 12], [5, 9, 4, 6]])
    assert nodes_per_token(idx, 4).tolist() == [1, 4, 2]


def test_bytes_are_split_by_place():
    # EP ranks 0..3 on 2 nodes of 2 ranks; rank 1 sends [3, 5, 7, 11] rows
    assert split_by_place([3, 5, 7, 11], 1, lambda r: r // 2) == {"self": 5, "intra_node": 3, "cross_node": 18}


# ---------------------------------------------------------------------------------------------- multi-process
TWO = ["dp_shard=2,ep=1", "dp_shard=1,ep=2,nodes=2"]
FOUR = ["dp_shard=2,ep=2,nodes=2", "dp_shard=1,ep=4,nodes=2"]


def run_layouts(tmp_path_factory, nprocs, layouts):
    out = tmp_path_factory.mktemp(f"layouts{nprocs}")
    results = launch(["tests/parallel_worker.py", str(out), *layouts], nprocs, timeout=150)
    for rc, log in results:
        assert rc == 0, log[-3000:]
    return {spec: json.loads((out / f"{spec}.json").read_text()) for spec in layouts}


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    return run_layouts(tmp_path_factory, 2, TWO)


@pytest.fixture(scope="module")
def four_procs(tmp_path_factory):
    return run_layouts(tmp_path_factory, 4, FOUR)


def check_step(r: dict) -> None:
    assert r["loss_diff"] <= 1e-5 and r["grad_diff"] <= 1e-5 and r["norm_diff"] <= 1e-5, r
    assert r["bias_moved"] and r["bias_same_on_all_ranks"] and r["bias_equals_one_process"], r


@pytest.mark.parametrize("layout", TWO)
def test_two_process_step_equals_one_process(two_procs, layout):
    check_step(two_procs[layout])


@pytest.mark.parametrize("layout", FOUR)
def test_four_process_step_equals_one_process(four_procs, layout):
    check_step(four_procs[layout])


@pytest.mark.parametrize("nprocs", [2, 4])
def test_expert_dispatch_round_trip_is_exact(two_procs, four_procs, nprocs):
    r = (two_procs if nprocs == 2 else four_procs)[(TWO if nprocs == 2 else FOUR)[-1]]
    assert r["round_trip_exact"] and r["received_exact"]


def test_traffic_is_counted_and_node_limited(two_procs, four_procs):
    hidden_bytes = 64 * 4  # tiny: hidden 64, fp32
    for r, places in ((two_procs["dp_shard=1,ep=2,nodes=2"], ("self", "cross_node")),
                      (four_procs["dp_shard=1,ep=4,nodes=2"], ("self", "intra_node", "cross_node")),
                      (four_procs["dp_shard=2,ep=2,nodes=2"], ("self", "intra_node"))):
        t = r["traffic"]
        sent = sum(t[f"{p}_bytes"] for p in ("self", "intra_node", "cross_node"))
        assert sent == t["copies"] * hidden_bytes  # tokens x top-k x hidden x bytes
        assert all(t[f"{p}_bytes"] > 0 for p in places), t
        assert t["max_nodes_per_token"] <= TINY.topk_group  # each token on at most M = 1 node
        assert t["cross_node_dedup_bytes"] <= t["tokens"] * TINY.topk_group * hidden_bytes
    assert four_procs["dp_shard=2,ep=2,nodes=2"]["traffic"]["cross_node_bytes"] == 0  # EP inside a node


# ---------------------------------------------------------------------------------------------- settings
def test_parallel_settings_from_overrides_and_toml(tmp_path, monkeypatch):
    from nanoseek.errors import UserError
    from nanoseek.train.config import PretrainConfig, load_train_config

    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = load_train_config(PretrainConfig, None, ["model=tiny", "parallel.dp_shard=2", "parallel.ep=2",
                                                   "parallel.node_limited=false", "parallel.timeout_s=30"])
    assert (cfg.parallel.dp_shard, cfg.parallel.ep, cfg.parallel.timeout_s) == (2, 2, 30.0)
    assert cfg.to_dict()["parallel"]["ep"] == 2
    assert "parallel.ep=2" in cfg.override_args() and "parallel.pp=1" not in cfg.override_args()
    toml = tmp_path / "run.toml"
    toml.write_text('model = "tiny"\n[parallel]\ndp_shard = 4\n')
    assert load_train_config(PretrainConfig, str(toml), []).parallel.dp_shard == 4
    toml.write_text('model = "tiny"\n[parallel]\ndp_shard = "4"\n')
    with pytest.raises(UserError, match="setting `parallel.dp_shard` = '4': expected an integer"):
        load_train_config(PretrainConfig, str(toml), [])
    with pytest.raises(UserError, match="unknown setting 'parallel.tp'; known: parallel.dp_shard"):
        load_train_config(PretrainConfig, None, ["parallel.tp=2"])
    with pytest.raises(SettingError, match=r"`batch_size` = 6: must be a multiple of the data-parallel ranks \(4"):
        load_train_config(PretrainConfig, None, ["model=tiny", "parallel.dp_shard=4", "batch_size=6"])
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SettingError, match=r"= 4, but 1 process\(es\) were started"):
        load_train_config(PretrainConfig, None, ["model=tiny", "parallel.dp_shard=2", "parallel.ep=2"])


def test_one_process_recipes_refuse_parallel_settings(monkeypatch):
    from nanoseek.errors import UserError
    from nanoseek.model import DeepseekV3ForCausalLM
    from nanoseek.train.config import TrainerConfig
    from nanoseek.train.core import Trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = TrainerConfig(model="tiny", parallel=ParallelConfig(dp_shard=2))
    with pytest.raises(UserError, match="this command trains in one process only"):
        Trainer(cfg, DeepseekV3ForCausalLM(TINY), 1.0, 1)
