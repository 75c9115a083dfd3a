"""Pipeline parallelism: the model cut into stages that `torch.distributed.pipelining` runs (docs/distributed.md).

Stages. `parallel.pp` ranks hold `pp x k` stages, k = 1 for 1f1b and 2 for interleaved_1f1b, zbv and dualpipev.
The blocks are split into contiguous runs, as evenly as possible (the first stages take the extra blocks, since the
last one also runs the final norm, the head and the MTP modules); the first stage adds the embedding. Loop
schedules put stage s on rank s mod pp; V schedules (zbv, dualpipev) put stages r and 2pp-1-r on rank r, so the
first and the last stage share rank 0, as in DualPipe.

Shared weights. The MTP modules (last stage) embed the tokens ahead with the embedding of the first stage, and use
the output head, which is on the last stage anyway. The last stage holds a *mirror* of the embedding: a copy that
is not a parameter of the model (no optimizer state, not in checkpoints). After the backward its gradient (averaged
over the stage's data-parallel ranks) is added to the embedding's on the first stage, and after the optimizer step
the updated embedding is copied back into the mirror: one gradient sum and one weight copy per step, a local add
on V schedules (both stages on rank 0) and a broadcast between the first-stage and the last-stage rank of the same
data-parallel index on loop schedules. Every stage is its own FSDP2 root (what torch's schedules drive), which is
why the two stages on rank 0 cannot simply share the parameter object.

Losses. The last stage computes the whole loss of a micro-batch: next-token CE + lambda x MTP CE + the balance
losses of its MoE layers. A MoE layer on an earlier stage attaches its sequence-balance loss to the stage's output
(`_AttachLoss`: the output is unchanged, and its backward also starts the backward of the loss), so the router's
gradient is what one process computes. Gradients are scaled here, not by the schedule (`scale_grads=False`): each
micro-batch's loss is weighted 1 / (micro-batches x grad_accum). The values (LM, MTP, balance) are recorded per
micro-batch and summed over the pipeline ranks after the step, so every rank logs the same numbers.

The aux-free load counts stay per stage: `MoE.update_bias` sums them over the stage's data-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor

from nanoseek.model.moe import MoE
from nanoseek.model.transformer import DeepseekV3ForCausalLM, next_token_ce
from nanoseek.parallel.config import ParallelConfig
from nanoseek.parallel.expert_parallel import apply_expert_parallel
from nanoseek.parallel.fsdp import precision_policy
from nanoseek.parallel.mesh import ParallelContext
from nanoseek.parallel.overlap import install_overlap
from nanoseek.parallel.pipeline_trace import Action, StageTracker, peak_in_flight
from nanoseek.parallel.traffic import TrafficMeter

SCHEDULE_CLASSES = {"1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
                    "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}


# ---------------------------------------------------------------------------------------------- the layout
def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous runs of blocks, one per stage, sizes differing by at most one (the first stages take the
    extra blocks: the last stage also runs the norm, the head and the MTP modules)."""
    base, extra = divmod(n_layers, n_stages)
    runs, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        runs.append(range(start, start + size))
        start += size
    return runs


def stage_ranks(cfg: ParallelConfig) -> dict[int, int]:
    """Stage -> pipeline rank: a loop (s mod pp) or a V (rank r holds stages r and 2pp-1-r)."""
    n = cfg.stages
    if cfg.v_shape:
        return {s: s if s < cfg.pp else n - 1 - s for s in range(n)}
    return {s: s % cfg.pp for s in range(n)}


# ---------------------------------------------------------------------------------------------- a stage
class _AttachLoss(torch.autograd.Function):
    """h unchanged; its backward also sends `scale` into `loss` (a loss computed by a stage that is not the last)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.loss_like = (loss.shape, loss.dtype, loss.device)
        return h.clone()  # a new tensor: FSDP2 hooks the stage's output, which must not be a view

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.loss_like
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class StageModule(nn.Module):
    """One pipeline stage: the model's own modules for blocks `layers` (+ embedding on the first stage, + norm,
    head, MTP modules and the embedding mirror on the last). forward(x, tokens): x is the tokens on the first
    stage, the previous stage's hidden states elsewhere; `tokens` (every stage gets its micro-batch) are the
    labels and the MTP inputs. Returns the hidden states, or on the last stage the micro-batch's loss [1]."""

    def __init__(self, model: DeepseekV3ForCausalLM, index: int, layers: range, first: bool, last: bool):
        super().__init__()
        self.index, self.first, self.last = index, first, last
        self.rotary = model.model.rotary_emb
        self.embed = model.model.embed_tokens if first else None
        self.blocks = nn.ModuleList(model.model.layers[i] for i in layers)
        self.norm = model.model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.mtp = model.mtp if last else nn.ModuleList()
        self.mirror = (nn.Parameter(model.model.embed_tokens.weight.detach().clone())
                       if last and len(model.mtp) else None)
        self.moes = [m for m in self.modules() if isinstance(m, MoE)]  # a list: not registered twice
        self.mtp_weight = 0.0  # lambda, set before each step
        self.loss_scale = 1.0  # gradient weight of one micro-batch's loss, set before each step
        self.records: list[torch.Tensor] = []  # per micro-batch: (lm, mtp, balance), detached

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        position_ids = torch.arange(T, device=tokens.device).unsqueeze(0)
        cos, sin = self.rotary(position_ids)
        h = self.embed(x) if self.first else x
        for block in self.blocks:
            h = block(h, cos, sin)
        if not self.last:
            balance = self.balance()
            if balance is not None and torch.is_grad_enabled():
                h = _AttachLoss.apply(h, balance, self.loss_scale)
            self.record(None, None, balance)
            return h
        hidden = self.norm(h)
        lm = next_token_ce(self.lm_head(hidden), tokens)
        loss, mtp = lm, None
        if len(self.mtp) and T > len(self.mtp) + 1 and self.mtp_weight != 0:
            mtp = self.mtp_loss(hidden, tokens, position_ids)
            loss = loss + self.mtp_weight * mtp
        balance = self.balance()
        if balance is not None:
            loss = loss + balance
        self.record(lm, mtp, balance)
        return torch.stack([loss])  # [1], a new tensor (not a view: FSDP2 hooks it)

    def mtp_loss(self, hidden: torch.Tensor, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """As `DeepseekV3ForCausalLM._mtp_loss`, with the mirror as the embedding."""
        T, losses, h = tokens.shape[1], [], hidden
        for k, module in enumerate(self.mtp, start=1):
            n = T - k
            cos, sin = self.rotary(position_ids[:, :n])
            h = module(h[:, :n], nn.functional.embedding(tokens[:, k:], self.mirror), cos, sin)
            losses.append(next_token_ce(self.lm_head(module.shared_head.norm(h)), tokens[:, k:]))
        return torch.stack(losses).mean()

    def balance(self) -> torch.Tensor | None:
        losses = [m.balance_loss for m in self.moes if m.balance_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def record(self, lm, mtp, balance) -> None:
        """(lm, mtp, balance, has mtp, has balance), kept on the device: no host sync inside the schedule."""
        device = next(v for v in (lm, mtp, balance, self.rotary.inv_freq) if v is not None).device
        values = [v.detach().double() if v is not None else torch.zeros((), dtype=torch.float64, device=device)
                  for v in (lm, mtp, balance)]
        flags = torch.tensor([mtp is not None, balance is not None], dtype=torch.float64, device=device)
        self.records.append(torch.cat([torch.stack(values), flags]))


def prune(model: DeepseekV3ForCausalLM, layers: list[int], first: bool, last: bool) -> None:
    """Keep only what this rank's stages hold. `model.model.layers` becomes a ModuleDict keyed by the layer
    number, so every parameter keeps its name (checkpoints and the HF export stay the same)."""
    model.model.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in layers})
    if not first:
        model.model.embed_tokens = None
    if not last:
        model.model.norm = None
        model.lm_head = None
        model.mtp = nn.ModuleList()


# ---------------------------------------------------------------------------------------------- the pipeline
class Pipeline:
    """This rank's stages of `model` (pruned in place to them), laid out with EP and FSDP2 over the stage's
    data-parallel ranks, and the schedule that runs them."""

    def __init__(self, model: DeepseekV3ForCausalLM, ctx: ParallelContext, meter: TrafficMeter | None = None):
        cfg = ctx.cfg
        self.ctx, self.cfg, self.model = ctx, cfg, model
        self.group = ctx.mesh.get_group("pp")
        self.pp_rank = ctx.mesh.get_local_rank("pp")
        self.n_stages = cfg.stages
        self.stage_rank = stage_ranks(cfg)
        self.my_stages = [s for s in range(self.n_stages) if self.stage_rank[s] == self.pp_rank]
        runs = split_layers(model.config.num_hidden_layers, self.n_stages)
        self.layers = {s: runs[s] for s in self.my_stages}
        last = self.n_stages - 1
        self.chunks = [StageModule(model, s, runs[s], s == 0, s == last) for s in self.my_stages]
        self.params_per_stage = {c.index: sum(p.numel() for p in c.parameters() if p is not c.mirror)
                                 for c in self.chunks}
        prune(model, [i for s in self.my_stages for i in runs[s]], 0 in self.my_stages, last in self.my_stages)
        experts = apply_expert_parallel(model, ctx, meter) if cfg.ep > 1 else set()
        if cfg.overlap:  # each micro-batch's MoE blocks interleave two halves (nanoseek.parallel.overlap)
            install_overlap(model, cfg.ep)
        self.shard(experts)
        for moe in model.moe_layers():
            moe.balance_group = ctx.dp_mesh.get_group()  # the loads of this stage's ranks only
        # global ranks of (first stage's rank, last stage's rank) for every data-parallel index
        grid = ctx.mesh.mesh.reshape(cfg.pp, -1)
        first_rank, last_rank = self.stage_rank[0], self.stage_rank[last]
        self.pairs = [(int(grid[first_rank, i]), int(grid[last_rank, i])) for i in range(grid.shape[1])]
        self.pair_group = None
        if first_rank != last_rank and model.config.num_nextn_predict_layers:
            for pair in self.pairs:  # every rank creates every group, in the same order
                group = dist.new_group(list(pair))
                if ctx.rank in pair:
                    self.pair_group = group
        self.schedule = None
        self.batch_shape: tuple[int, int] | None = None
        self.tracker = StageTracker()  # timings and activation bytes, when switched on (first step, benchmark)
        self.tracker.active = True  # the first step is measured for the memory report (ParallelRuntime)

    def shard(self, experts: set[nn.Parameter]) -> None:
        """FSDP2 over the stage's data-parallel ranks: each stage is a root (the schedules drive the roots'
        gradient sync); expert weights (sharded by EP) and the embedding mirror are left out. Loop schedules
        also make each block its own unit (gathered just before it runs). The V schedules split the backward
        into an input pass and a later weight pass, and with nested units the weight pass of the last stage
        left its blocks without gradients (torch 2.13, measured): there the whole stage is one unit."""
        policy = precision_policy(self.ctx.device)
        for chunk in self.chunks:
            blocks = [*chunk.blocks, *(m.block for m in chunk.mtp)] if not self.cfg.v_shape else []
            for block in blocks:
                mine = {p for p in block.parameters() if p in experts}
                fully_shard(block, mesh=self.ctx.dp_mesh, mp_policy=policy, ignored_params=mine or None)
            ignored = {p for p in chunk.parameters() if p in experts} | ({chunk.mirror} if chunk.mirror is not None
                                                                          else set())
            fully_shard(chunk, mesh=self.ctx.dp_mesh, mp_policy=policy, ignored_params=ignored or None)

    # ------------------------------------------------------------------ facts
    @property
    def first_chunk(self) -> StageModule | None:
        return next((c for c in self.chunks if c.first), None)

    @property
    def last_chunk(self) -> StageModule | None:
        return next((c for c in self.chunks if c.last), None)

    def hidden_dtype(self) -> torch.dtype:
        return precision_policy(self.ctx.device).param_dtype or torch.float32

    def global_rank(self, pp_rank: int) -> int:
        """The rank of pipeline rank `pp_rank` with this rank's data-parallel coordinates."""
        return dist.get_global_rank(self.group, pp_rank)

    # ------------------------------------------------------------------ a training step
    def build_schedule(self, rows: int, seq_len: int) -> None:
        """The torch stages and schedule for micro-batches of `rows` x `seq_len` tokens (shapes given, so
        torch does not run the stages to infer them)."""
        device, D = self.ctx.device, self.model.config.hidden_size
        tokens = torch.empty(rows, seq_len, dtype=torch.long, device="meta")
        hidden = torch.empty(rows, seq_len, D, dtype=self.hidden_dtype(), device="meta", requires_grad=True)
        loss = torch.empty(1, dtype=torch.float32, device="meta", requires_grad=True)
        stages = [PipelineStage(c, c.index, self.n_stages, device, input_args=tokens if c.first else hidden,
                                output_args=loss if c.last else hidden, group=self.group) for c in self.chunks]
        for stage in stages:
            self.tracker.attach(stage)
        kind = SCHEDULE_CLASSES[self.cfg.schedule]
        n = self.cfg.n_microbatches
        self.schedule = kind(stages[0] if kind is Schedule1F1B else stages, n, loss_fn=self.micro_loss,
                             scale_grads=False)
        self.batch_shape = (rows * n, seq_len)

    def micro_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.sum() * self.last_chunk.loss_scale

    def step(self, tokens: torch.Tensor, mtp_weight: float, scale: float = 1.0) -> dict[str, float]:
        """Forward and backward of this rank's rows `tokens` [B, T] through the pipeline; gradients accumulate
        in the parameters, weighted `scale` (1 / grad_accum). Returns the loss values of the whole pipeline
        (this data-parallel rank's rows), the same on every pipeline rank."""
        n = self.cfg.n_microbatches
        if self.batch_shape != tuple(tokens.shape):
            self.build_schedule(tokens.shape[0] // n, tokens.shape[1])
        for chunk in self.chunks:
            chunk.mtp_weight, chunk.loss_scale = mtp_weight, scale / n
            chunk.records.clear()
        args = (tokens,) if self.first_chunk is not None else ()
        target = tokens if self.last_chunk is not None else None
        self.schedule.step(*args, target=target, return_outputs=False, tokens=tokens)
        return self.reduce_records(mtp_weight)

    def reduce_records(self, mtp_weight: float) -> dict[str, float]:
        totals = torch.zeros(5, dtype=torch.float64, device=self.ctx.device)
        for chunk in self.chunks:
            for r in chunk.records:
                totals += r.to(totals.device)
            chunk.records.clear()
        dist.all_reduce(totals, group=self.group)
        n = self.cfg.n_microbatches
        lm, mtp, balance = (totals[:3] / n).tolist()
        out = {"loss": lm + mtp_weight * mtp + balance, "lm_loss": lm}
        if totals[3] > 0:
            out["mtp_loss"] = mtp
        if totals[4] > 0:
            out["balance_loss"] = balance
        return out

    # ------------------------------------------------------------------ the shared embedding
    @torch.no_grad()
    def fold_mirror_grad(self) -> None:
        """Add the last stage's embedding-mirror gradient (averaged over its data-parallel ranks, as FSDP2
        averages the others) to the embedding's gradient on the first stage."""
        if not self.model.config.num_nextn_predict_layers:
            return
        first, last = self.first_chunk, self.last_chunk
        grad = None
        if last is not None:
            grad = last.mirror.grad if last.mirror.grad is not None else torch.zeros_like(last.mirror)
            dist.all_reduce(grad, group=self.ctx.dp_mesh.get_group())
            grad /= self.ctx.dp_size
            last.mirror.grad = None
        if self.pair_group is not None:  # loop layout: the first and the last stage on two ranks
            if grad is None:
                grad = torch.empty(self.embedding_shape(), dtype=torch.float32, device=self.ctx.device)
            dist.broadcast(grad, self.pair_src(last=True), group=self.pair_group)
        if first is not None:  # FSDP2 shards dim 0 like torch.chunk: this rank's rows of the sum
            local = self.embedding_local_grad(first)
            parts = grad.chunk(self.ctx.dp_size)
            if self.ctx.dp_rank < len(parts):
                local.add_(parts[self.ctx.dp_rank].to(local.dtype))

    def embedding_shape(self) -> tuple[int, int]:
        return (self.model.config.vocab_size, self.model.config.hidden_size)

    def embedding_local_grad(self, first: StageModule | None) -> torch.Tensor:
        p = first.embed.weight
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        return p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad

    def pair_src(self, last: bool) -> int:
        """The global rank that sends within this rank's (first stage, last stage) pair."""
        pair = next(p for p in self.pairs if self.ctx.rank in p)
        return pair[1] if last else pair[0]

    @torch.no_grad()
    def refresh_mirror(self) -> None:
        """After the optimizer step (or a checkpoint load): the mirror takes the embedding's new values."""
        if not self.model.config.num_nextn_predict_layers:
            return
        first, last = self.first_chunk, self.last_chunk
        full = None
        if first is not None:
            w = first.embed.weight
            full = w.full_tensor() if isinstance(w, DTensor) else w.detach()
        if self.pair_group is not None:
            if full is None:
                full = torch.empty(self.embedding_shape(), dtype=last.mirror.dtype, device=last.mirror.device)
            else:
                full = full.contiguous()
            dist.broadcast(full, self.pair_src(last=False), group=self.pair_group)
        if last is not None:
            last.mirror.copy_(full)

    # ------------------------------------------------------------------ evaluation and export
    @torch.no_grad()
    def forward_loss(self, tokens: torch.Tensor) -> float:
        """Next-token loss of `tokens` [B, T] (MTP skipped) through the stages in order, forward only, with
        blocking sends between ranks; the value is broadcast from the last stage to the whole pipeline."""
        h = None
        for s in range(self.n_stages):
            if self.stage_rank[s] != self.pp_rank:
                continue
            chunk = next(c for c in self.chunks if c.index == s)
            prev = self.stage_rank.get(s - 1)
            if s > 0 and prev != self.pp_rank:
                h = torch.empty(*tokens.shape, self.model.config.hidden_size, dtype=self.hidden_dtype(),
                                device=tokens.device)
                dist.recv(h, self.global_rank(prev), group=self.group)
            chunk.mtp_weight = 0.0
            h = chunk(tokens if chunk.first else h, tokens)
            if chunk.last:  # the next-token loss alone (the output adds the balance losses in training mode)
                h = chunk.records[-1][0].float()
            chunk.records.clear()
            nxt = self.stage_rank.get(s + 1)
            if nxt is not None and nxt != self.pp_rank:
                dist.send(h.contiguous(), self.global_rank(nxt), group=self.group)
        loss = h.reshape(1).to(tokens.device) if self.last_chunk is not None else torch.zeros(1, device=tokens.device)
        dist.broadcast(loss, self.global_rank(self.stage_rank[self.n_stages - 1]), group=self.group)
        return float(loss.item())

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every rank: gather the whole model's weights (every stage's) on rank 0 (CPU); others get {}."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        mine = {k: v.detach().cpu() for k, v in state.items()} if self.ctx.dp_rank == 0 else {}
        gathered = [None] * self.ctx.world_size if self.ctx.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        if not self.ctx.is_main:
            return {}
        return {k: v for part in gathered for k, v in part.items()}

    # ------------------------------------------------------------------ memory
    def planned_actions(self) -> list:
        """This rank's compute actions in the order the schedule runs them: torch's schedule IR, except for
        1F1B, whose runner does not follow its IR (it runs min(n, pp - s) forwards, then backward-forward
        pairs, then the remaining backwards)."""
        if isinstance(self.schedule, Schedule1F1B):
            n, s = self.cfg.n_microbatches, self.my_stages[0]
            warmup = min(n, self.cfg.pp - s)
            order = [("F", i) for i in range(warmup)]
            for b in range(n):
                order.append(("B", b))
                if warmup + b < n:
                    order.append(("F", warmup + b))
            return [Action(s, kind, mb, 0.0, 0.0) for kind, mb in order]
        return [a for a in self.schedule.pipeline_order[self.pp_rank] if a is not None]

    def memory_report(self) -> dict:
        """This rank's stages: parameters (the whole stage, and this rank's shards of it) and activations: the
        micro-batches a stage holds at once (forward done, last backward not yet), measured by the tracker
        during the last tracked step and as the schedule's own plan implies, and the bytes autograd saved per
        micro-batch's forward. Call after a step run with `tracker.active` set."""
        planned = peak_in_flight(self.planned_actions())
        measured = peak_in_flight(self.tracker.actions())
        stages = []
        for chunk in self.chunks:
            local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in chunk.parameters()
                        if p is not chunk.mirror)
            saved = self.tracker.saved_bytes.get(chunk.index, [])
            stages.append({"stage": chunk.index, "layers": list(self.layers[chunk.index]),
                           "params": self.params_per_stage[chunk.index], "params_local": local,
                           "mirror_params": chunk.mirror.numel() if chunk.mirror is not None else 0,
                           "in_flight": measured["per_stage"].get(chunk.index, 0),
                           "in_flight_planned": planned["per_stage"].get(chunk.index, 0),
                           "activation_bytes_per_microbatch": max(saved) if saved else 0})
        return {"pp_rank": self.pp_rank, "schedule": self.cfg.schedule, "pp": self.cfg.pp,
                "microbatches": self.cfg.n_microbatches, "stages": stages,
                "in_flight": measured["rank"], "in_flight_planned": planned["rank"],
                "activation_bytes_peak": measured["rank_bytes"](self.tracker.saved_bytes)}
