"""Microbenchmarks of this machine for `nanoseek plan --calibrate`, one thread, in CPU seconds: GEMM
throughput at given shapes (forward and both gradient GEMMs), whole units timed forward + backward (the
attention core, the output head + loss), the copy bandwidth, the cost per dispatched op, and a gloo
all-reduce between two local processes. Each is a property of the machine at a shape; the units run
nanoseek's own code where it has one (the experts' grouped GEMMs)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nanoseek.model.moe import expert_mlp

def _best_seconds(fn, reps: int) -> float:
    """The fastest of `reps` runs after a warm-up, in CPU seconds of this process: on a machine shared
    with other jobs, wall-clock time also counts the time spent waiting for a core, CPU time does not
    (one thread: they agree on an idle machine). The training steps are timed in CPU seconds too."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return max(min(times), 1e-9)


def gemm_flops_per_s(m: int, k: int, n: int, reps: int = 3) -> float:
    """fp32 FLOP/s of a linear layer's three GEMMs on this CPU, as nn.Linear and autograd lay them out:
    forward x[m,k] @ W[n,k]^T, input gradient g[m,n] @ W[n,k], weight gradient g^T[n,m] @ x[m,k]
    (the FLOP-weighted rate of the three; best of `reps` after one warm-up each)."""
    x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    seconds = sum(_best_seconds(fn, reps) for fn in (lambda: x @ w.t(), lambda: g @ w, lambda: g.t() @ x))
    return 3 * 2 * m * k * n / seconds


def memory_bytes_per_s(nbytes: int = 64 << 20, reps: int = 5) -> float:
    """Bytes per CPU second one thread moves copying a large fp32 tensor (read + write), best of `reps`."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), reps)


def _forward_backward(fn, inputs: list[torch.Tensor]):
    """A callable running fn(*inputs) and its backward (gradients cleared each time)."""
    def run():
        for x in inputs:
            x.grad = None
        fn(*inputs).backward()
    return run


def attention_seconds(batch: int, heads: int, seq_len: int, dqk: int, dv: int, reps: int = 3) -> float:
    """CPU seconds of one causal attention core, forward + backward, as nanoseek runs it: torch's
    scaled_dot_product_attention, whose CPU kernel for unequal q/k and v head dims (MLA) is the math
    one (the full T x T products, mask, softmax, and their gradients)."""
    q, k = (torch.randn(batch, heads, seq_len, dqk, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, heads, seq_len, dv, requires_grad=True)
    return _best_seconds(_forward_backward(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(), [q, k, v]), reps)


def head_loss_seconds(batch: int, seq_len: int, d: int, vocab: int, reps: int = 3) -> float:
    """CPU seconds of the output head and the next-token cross-entropy, forward + backward, as nanoseek
    runs them: logits = h W^T, shifted by one position, log-softmax and NLL over the vocabulary."""
    h = torch.randn(batch, seq_len, d, requires_grad=True)
    w = (torch.randn(vocab, d) * d ** -0.5).requires_grad_()
    target = torch.randint(0, vocab, (batch * (seq_len - 1),))

    def loss(h, w):
        logits = F.linear(h, w)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, vocab).float(), target)
    return _best_seconds(_forward_backward(loss, [h, w]), reps)


def experts_seconds(rows: int, d: int, inter: int, experts: int, reps: int = 3) -> float:
    """CPU seconds of the routed experts' SwiGLU, forward + backward, as nanoseek runs it
    (`nanoseek.model.moe.expert_mlp`: two grouped GEMMs over `experts` groups with the gating between
    them) on `rows` token copies spread evenly over the experts."""
    x = torch.randn(rows, d, requires_grad=True)
    gate_up = (torch.randn(experts, 2 * inter, d) * d ** -0.5).requires_grad_()
    down = (torch.randn(experts, d, inter) * inter ** -0.5).requires_grad_()
    counts = torch.full((experts,), rows // experts)
    counts[: rows % experts] += 1
    offsets = counts.cumsum(0).to(torch.int32)
    grad = torch.randn(rows, d)

    def run():
        for t in (x, gate_up, down):
            t.grad = None
        expert_mlp(x, gate_up, down, offsets).backward(grad)
    return _best_seconds(run, reps)


def shape_flops_per_s(shape: tuple, reps: int = 3) -> float:
    """A linear layer's GEMMs (`gemm_flops_per_s`); for (b, m, k, n), a batched product and its two
    gradient products; for ("attention", B, h, T, dqk, dv), ("experts", rows, d, I, E) and
    ("head+loss", B, T, d, V), the unit's forward + backward time as a rate on 3 x its counted forward
    FLOPs (causal attention: half the T x T products)."""
    if shape[0] == "attention":
        b, h, t, dqk, dv = shape[1:]
        return 3 * 2 * b * h * t * t * (dqk + dv) / 2 / attention_seconds(b, h, t, dqk, dv, reps)
    if shape[0] == "experts":
        rows, d, inter, experts = shape[1:]
        return 3 * 2 * rows * d * 3 * inter / experts_seconds(rows, d, inter, experts, reps)
    if shape[0] == "head+loss":
        b, t, d, vocab = shape[1:]
        return 3 * 2 * b * t * d * vocab / head_loss_seconds(b, t, d, vocab, reps)
    if len(shape) == 3:
        return gemm_flops_per_s(*shape, reps=reps)
    b, m, k, n = shape
    x, y, g = torch.randn(b, m, k), torch.randn(b, k, n), torch.randn(b, m, n)
    seconds = sum(_best_seconds(fn, reps) for fn in (lambda: torch.bmm(x, y), lambda: torch.bmm(g, y.transpose(1, 2)),
                                                       lambda: torch.bmm(x.transpose(1, 2), g)))
    return 3 * 2 * b * m * k * n / seconds


class OpCounter(TorchDispatchMode):
    """Counts the ops torch dispatches (after autograd: forward, backward and optimizer ops alike)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class _MiniBlock(nn.Module):
    """A pre-norm SwiGLU residual block at a width where every op's arithmetic is negligible."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.RMSNorm(width)
        self.up = nn.Linear(width, 4 * width, bias=False)
        self.down = nn.Linear(2 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def op_seconds(blocks: int = 8, width: int = 8, reps: int = 5) -> dict[str, float]:
    """CPU seconds per dispatched op of a training step of a tiny stack of `_MiniBlock`s (forward,
    backward, gradient clipping, torch's AdamW, zero_grad): what an op costs whatever its size
    (Python, dispatcher, autograd, allocation), the per-op overhead of a small model's step."""
    torch.manual_seed(0)
    model = nn.Sequential(*(_MiniBlock(width) for _ in range(blocks)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, 4, width)

    def step():
        model(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    with OpCounter() as counter:
        step()
    seconds = _best_seconds(step, reps)
    return {"op_s": seconds / counter.ops, "ops": counter.ops, "step_s": seconds}


def _all_reduce_worker(rank: int, init_file: str, nbytes: int, reps: int, out: str) -> None:
    import torch.distributed as dist  # in the spawned child
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x = torch.ones(nbytes // 4)
    dist.all_reduce(x)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(x)
    dt = (time.perf_counter() - t0) / reps
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": dt}))
    dist.destroy_process_group()


def all_reduce_bytes_per_s(nbytes: int = 8 << 20, reps: int = 5, timeout: float = 60.0) -> float | None:
    """Bus bandwidth of a 2-process gloo all-reduce (each rank sends (n-1)/n x 2 x the tensor: one
    tensor's worth for n = 2); None when the processes cannot be started here."""
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        procs = [ctx.Process(target=_all_reduce_worker, args=(r, init, nbytes, reps, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        if any(p.is_alive() for p in procs):
            for p in procs:
                p.kill()
            return None
        if not os.path.exists(out):
            return None
        seconds = json.loads(Path(out).read_text())["seconds"]
    return nbytes / seconds
