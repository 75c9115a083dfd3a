"""Training-inference consistency of RL on an MoE policy: are the tokens we train on scored by the
same model that sampled them?

The sampler (`nanoseek.inference`, cached decode: absorbed MLA over the latent cache, one token at a
time) and the training forward (full sequences, naive MLA, other kernels and batch shapes) compute the
same function in different float orders. For a dense model that costs ~1e-6 in log-probability. In an
MoE a tiny difference in router scores can flip which experts a token goes to, and then the two passes
compute *different* functions: the importance ratio pi_theta / pi_old is no longer ~1 on policy, and
users of large MoE RL report collapses from it. Two measures, logged every GRPO step:

* `logp_gap_mean` / `logp_gap_max`: |log p(engine) - log p(training forward)| on the sampled tokens;
* `routing_mismatch`: share of (token, MoE layer) routings whose expert set differs between the
  rollout pass and the training pass.

`replay_routing=true` makes the training forward use the rollout's experts (Rollout Routing Replay:
the gate weights are still computed from the training pass's scores, so the router keeps its gradient).

Mechanics: `Router.route_hook` (nanoseek.model.router) sees every routing decision. During generation
`recording_routes` keeps each forward call's expert indices; `engine_routes` maps them back to (row,
position) by replaying the engine's batch layout (left-padded prefill, then one token per decode step,
with finished rows dropped as `RequestRows.compact` does). During training `RouteCheck` compares (and,
with replay, replaces) the routing of each position that both passes computed: the prompt and every
completion token but the last (the engine never feeds the last token back).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

ROUTE_DTYPE = torch.int16  # expert indices as stored in rollout batches and checkpoints (E <= 32767)


def moe_routers(model) -> list:
    """The routers of the trunk's MoE layers, in layer order (MTP modules excluded: GRPO never runs them)."""
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


@contextmanager
def recording_routes(model) -> Iterator[list[list[torch.Tensor]]]:
    """Record every routing decision: yields calls[layer] = [idx [rows, K] of each forward call]."""
    routers = moe_routers(model)
    calls: list[list[torch.Tensor]] = [[] for _ in routers]

    def recorder(layer: int):
        def hook(idx: torch.Tensor) -> torch.Tensor:
            calls[layer].append(idx.to("cpu", ROUTE_DTYPE))
            return idx
        return hook

    for i, router in enumerate(routers):
        router.route_hook = recorder(i)
    try:
        yield calls
    finally:
        for router in routers:
            router.route_hook = None


def engine_routes(calls: list[list[torch.Tensor]], prompt_lens: Sequence[int],
                  completion_lens: Sequence[int]) -> list[torch.Tensor]:
    """One generation call's recorded routing -> per row [layers, prompt + completion - 1, K].

    The engine's layout: call 0 is the prefill of the left-padded prompts [B, P]; decode call j feeds
    token j-1 of every row it still holds, and after step j, once at most half of its rows are
    unfinished, it drops the finished ones (`nanoseek.inference.requests.RequestRows.compact`)."""
    B, P = len(prompt_lens), max(prompt_lens)
    longest = max(completion_lens)
    if any(len(c) != longest for c in calls):
        raise RuntimeError(f"routing record has {[len(c) for c in calls]} forward calls per layer, "
                           f"expected {longest} (prefill + decode steps): the engine's layout changed")
    if any(layer[0].shape[0] != B * P for layer in calls):
        raise RuntimeError(f"the prefill routed {calls[0][0].shape[0]} positions, expected {B} x {P}: "
                           "the engine's layout changed")
    parts: list[list[list[torch.Tensor]]] = [[] for _ in range(B)]  # parts[row][layer]
    for row in range(B):
        for layer in calls:
            prefill = layer[0].view(B, P, -1)
            parts[row].append([prefill[row, P - prompt_lens[row]:]])
    requests = list(range(B))
    for j in range(1, longest):
        unfinished = sum(n > j for n in completion_lens)
        if unfinished * 2 <= len(requests):
            requests = [r for r in requests if completion_lens[r] > j]
        for l, layer in enumerate(calls):
            step = layer[j]
            if step.shape[0] != len(requests):
                raise RuntimeError(f"decode call {j} routed {step.shape[0]} rows, expected "
                                   f"{len(requests)}: the engine's layout changed")
            for b, r in enumerate(requests):
                if completion_lens[r] > j:
                    parts[r][l].append(step[b:b + 1])
    return [torch.stack([torch.cat(p) for p in row]) for row in parts]


def batch_routes(rows: Sequence[tuple[int, torch.Tensor | None]], width: int) -> torch.Tensor | None:
    """Per-row routes [layers, n, K] placed at positions 0..n-1 of a right-padded [N, width] batch ->
    [N, layers, width, K], -1 where the rollout computed no routing. None if any row has none."""
    if not rows or any(r is None for _, r in rows):
        return None
    layers, _, k = rows[0][1].shape
    out = torch.full((len(rows), layers, width, k), -1, dtype=ROUTE_DTYPE)
    for i, (_, r) in enumerate(rows):
        out[i, :, :r.shape[1]] = r
    return out


class RouteCheck:
    """Hooks for one training forward over [n, W] tokens: count the routings that differ from the
    rollout's `routes` [n, layers, W, K] (-1 = not recorded) and, with `replay`, use the rollout's."""

    def __init__(self, routes: torch.Tensor | None, replay: bool = False):
        self.routes, self.replay = routes, replay
        self.mismatched = 0  # (token, layer) pairs whose expert sets differ
        self.compared = 0

    @property
    def share(self) -> float:
        return self.mismatched / max(self.compared, 1)

    def hook(self, layer: int):
        def check(idx: torch.Tensor) -> torch.Tensor:
            recorded = self.routes[:, layer].reshape(-1, idx.shape[1]).to(idx.device, torch.long)
            if recorded.shape[0] != idx.shape[0]:
                raise RuntimeError(f"routes for {recorded.shape[0]} positions, forward routed {idx.shape[0]}")
            valid = recorded[:, 0] >= 0
            differ = (recorded.sort(-1).values != idx.sort(-1).values).any(-1) & valid
            self.mismatched += int(differ.sum())
            self.compared += int(valid.sum())
            return torch.where(valid[:, None], recorded, idx) if self.replay else idx
        return check

    @contextmanager
    def on(self, model) -> Iterator["RouteCheck"]:
        routers = moe_routers(model) if self.routes is not None else []
        if routers and self.routes.shape[1] != len(routers):
            raise RuntimeError(f"routes of {self.routes.shape[1]} MoE layers for a model with {len(routers)}")
        for i, router in enumerate(routers):
            router.route_hook = self.hook(i)
        try:
            yield self
        finally:
            for router in routers:
                router.route_hook = None


def logp_gap(train_logp: torch.Tensor, engine_logp: torch.Tensor, sampled: torch.Tensor) -> tuple[float, float, int]:
    """(sum, max, count) of |train - engine| over the sampled tokens (`sampled` [N, T] bool)."""
    if not sampled.any():
        return 0.0, 0.0, 0
    gap = (train_logp.detach().float() - engine_logp.to(train_logp.device).float()).abs()[sampled.to(train_logp.device)]
    return float(gap.sum()), float(gap.max()), int(gap.numel())
