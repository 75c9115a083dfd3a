"""All-to-all traffic of expert parallelism, split by where it goes: the rank itself, another rank of the
same node, or another node.

Dispatch sends every (token, expert) copy to the EP rank holding that expert; combine sends the expert
outputs back, the same number of rows. One row is `hidden x bytes per element`, so a step's dispatch
volume is tokens x top-k x hidden x bytes (the formula `benchmarks/distributed.py` checks). DeepSeek-V3
sends a token once per node and fans it out over NVLink there, so its cross-node cost is the number of
distinct (token, other node) pairs; `cross_node_dedup_bytes` counts that, and node-limited routing caps
it at M rows per token (M = topk_group). nanoseek itself sends one row per copy (`cross_node_bytes`).
"""

from __future__ import annotations

from collections import defaultdict

import torch


def nodes_per_token(idx: torch.Tensor, experts_per_node: int) -> torch.Tensor:
    """idx [N, K] expert ids -> [N] the number of distinct nodes each token's experts live on."""
    nodes = idx // experts_per_node
    first = torch.ones_like(nodes, dtype=torch.bool)
    ordered = nodes.sort(dim=1).values
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return first.sum(1)


def split_by_place(rows_to: list[int], me: int, node_of) -> dict[str, int]:
    """Rows sent to each EP rank -> rows kept on this rank, sent within its node, sent to other nodes."""
    out = {"self": 0, "intra_node": 0, "cross_node": 0}
    for dest, rows in enumerate(rows_to):
        place = "self" if dest == me else "intra_node" if node_of(dest) == node_of(me) else "cross_node"
        out[place] += rows
    return out


class TrafficMeter:
    """Accumulates the dispatch traffic of every MoE forward of one rank until `take()`."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def record(self, idx: torch.Tensor, rows_to: list[int], row_bytes: int, me: int, node_of,
               experts_per_node: int) -> None:
        places = split_by_place(rows_to, me, node_of)
        for place, rows in places.items():
            self.totals[f"{place}_bytes"] += rows * row_bytes
        my_node = node_of(me)
        token_nodes = idx // experts_per_node
        distinct = nodes_per_token(idx, experts_per_node)
        touches_own = (token_nodes == my_node).any(1)
        self.totals["cross_node_dedup_bytes"] += float((distinct - touches_own.long()).sum()) * row_bytes
        self.totals["tokens"] += idx.shape[0]
        self.totals["copies"] += idx.numel()
        self.totals["max_nodes_per_token"] = max(self.totals["max_nodes_per_token"], float(distinct.max()))

    def take(self) -> dict[str, float]:
        """The totals since the last call (bytes sent by this rank; combine sends the same back)."""
        out, self.totals = dict(self.totals), defaultdict(float)
        return out
