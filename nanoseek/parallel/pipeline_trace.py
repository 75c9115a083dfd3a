"""What a pipeline step did, per rank: the compute actions of its stages, timed, and the activations they held.

`StageTracker` wraps the torch stages' own compute calls (forward, full backward, input backward, weight
backward): each call's start and end, and the bytes autograd saved during each forward (tensors that are not
parameters). `peak_in_flight` replays actions in order (the tracker's, or a schedule's planned ones) and finds
the most micro-batches each stage, and the rank, held at once. `memory_lines` formats the per-rank reports of
`Pipeline.memory_report`. Used once at the start of a run (the memory log) and by benchmarks/pipeline.py.
"""

from __future__ import annotations

import time

import torch
from torch.distributed.pipelining import PipelineStage


def _kind(action) -> str:
    return str(getattr(action.computation_type, "value", action.computation_type))


def peak_in_flight(actions: list) -> dict:
    """Micro-batches whose activations are held at once, per stage and for the rank (the peak of the sum),
    from compute actions (stage, kind, micro-batch) in order: a forward (F) takes them, the backward that ends
    the micro-batch's use of the stage (a full backward B, or the weight pass W after an input pass I) frees
    them. Overlapped F&B actions count as their parts, in order."""
    flat = []
    for a in actions:
        subs = getattr(a, "sub_actions", None)
        flat.extend(subs if subs else [a])
    held: dict[int, set] = {}
    peak_stage: dict[int, int] = {}
    peak_rank, peak_set = 0, {}
    for a in flat:
        kind, stage, mb = _kind(a), a.stage_index, a.microbatch_index
        if kind == "F":
            held.setdefault(stage, set()).add(mb)
        elif kind in ("B", "W"):
            held.get(stage, set()).discard(mb)
        peak_stage[stage] = max(peak_stage.get(stage, 0), len(held.get(stage, ())))
        total = sum(len(v) for v in held.values())
        if total > peak_rank:
            peak_rank, peak_set = total, {k: set(v) for k, v in held.items()}

    def rank_bytes(saved: dict[int, list[int]]) -> int:
        return sum(max(saved.get(stage, [0]) or [0]) * len(mbs) for stage, mbs in peak_set.items())

    return {"per_stage": peak_stage, "rank": peak_rank, "rank_bytes": rank_bytes}


class Action:
    """A compute action this rank ran: stage, kind (F, B, I, W), micro-batch, start and end (perf_counter s)."""

    __slots__ = ("stage_index", "computation_type", "microbatch_index", "start", "end")

    def __init__(self, stage: int, kind: str, mb: int, start: float, end: float):
        self.stage_index, self.computation_type, self.microbatch_index = stage, kind, mb
        self.start, self.end = start, end


class StageTracker:
    """Times every compute action of this rank's torch stages (forward, full backward, input backward, weight
    backward) and sums the bytes autograd saves during each forward (tensors that are not parameters), while
    `active`. Installed by wrapping the stages' own methods; costs nothing when inactive."""

    def __init__(self) -> None:
        self.active = False
        self.events: list[Action] = []
        self.saved_bytes: dict[int, list[int]] = {}

    def clear(self) -> None:
        self.events.clear()
        self.saved_bytes.clear()

    def actions(self) -> list[Action]:
        return list(self.events)

    def attach(self, stage: PipelineStage) -> None:
        def timed(kind_of, method):
            def run(*args, **kwargs):
                if not self.active:
                    return method(*args, **kwargs)
                kind, mb = kind_of(*args, **kwargs)
                t0 = time.perf_counter()
                if kind == "F":
                    seen: set[int] = set()
                    total = [0]

                    def pack(t: torch.Tensor):
                        if not (t.is_leaf and t.requires_grad) and t.untyped_storage().data_ptr() not in seen:
                            seen.add(t.untyped_storage().data_ptr())
                            total[0] += t.untyped_storage().nbytes()
                        return t

                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        out = method(*args, **kwargs)
                    self.saved_bytes.setdefault(stage.stage_index, []).append(total[0])
                else:
                    out = method(*args, **kwargs)
                self.events.append(Action(stage.stage_index, kind, mb, t0, time.perf_counter()))
                return out
            return run

        stage.forward_one_chunk = timed(lambda mb, *a, **k: ("F", mb), stage.forward_one_chunk)
        stage.backward_one_chunk = timed(
            lambda mb, *a, full_backward=True, **k: ("B" if full_backward else "I", mb), stage.backward_one_chunk)
        stage.backward_weight_one_chunk = timed(lambda mb, *a, **k: ("W", mb), stage.backward_weight_one_chunk)


def memory_lines(reports: list[dict]) -> list[str]:
    """One line per pipeline rank (reports of `Pipeline.memory_report`, one per pipeline rank)."""
    lines = []
    for r in sorted(reports, key=lambda r: r["pp_rank"]):
        stages = ", ".join(f"stage {s['stage']} (layers {s['layers'][0]}-{s['layers'][-1]}: {s['params']:,} "
                           f"params, {s['params_local']:,} in this rank's shards"
                           + (f", + {s['mirror_params']:,} embedding mirror" if s["mirror_params"] else "")
                           + f"; {s['in_flight']} micro-batches held, planned {s['in_flight_planned']}; "
                           f"{s['activation_bytes_per_microbatch'] / 2**20:.2f} MiB each)" for s in r["stages"])
        lines.append(f"pipeline memory, rank {r['pp_rank']} of {r['pp']} ({r['schedule']}, {r['microbatches']} "
                     f"micro-batches): {stages}; at peak {r['in_flight']} stage micro-batches held (planned "
                     f"{r['in_flight_planned']}), {r['activation_bytes_peak'] / 2**20:.2f} MiB of activations")
    return lines
