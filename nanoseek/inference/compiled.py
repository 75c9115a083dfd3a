"""A compiled decode step: one compiled graph per batch size and cache length serves every step.

Decoding a small model is bound by per-op overhead, not FLOPs: an eager step of the bench preset is
~500 small kernels, each paying Python and dispatcher costs. Compiled, the norms, RoPE, router and
attention glue fuse into a handful of generated kernels around the matmuls (inductor: C++ on CPU, Triton
plus CUDA graphs on GPU).

On CPU each step is exported (`torch.export`) and compiled ahead of time by AOTInductor into a shared
library, so a step is one C++ call: `torch.compile`'s graph leaves a Python wrapper that launches each
generated kernel and a guard check before every call (measured on the bench preset: 128 tokens 1.26x
faster at batch 1, 1.05x at batch 8). The model's weights are inputs of the exported step, not constants:
it reads the model's current tensors at every call, as the eager forward does (nothing is copied; an
optimizer step or a replaced parameter is seen). On CUDA a step is `torch.compile`d with CUDA graphs
(one replay per step).

One graph must serve every step, so a step's shapes may not change as the cache fills:
- the cache is preallocated at a bucketed length (`static_length`) and each step is a static-shape step
  (`LatentKVCache.begin_static_step`): its slots are a tensor and its mask spans the whole cache, so
  attention reads every slot and unreserved ones are masked out like padding;
- the cache's bookkeeping (slot counter, positions, mask) runs eagerly before the graph; the graph
  receives plain tensors and writes the new latents in place;
- the routed experts (which experts a token uses is data, and eager CPU code runs them one by one for few
  tokens): for the few token copies of a decode step, reductions over the chosen experts' weights that
  inductor fuses (`gathered_experts`), or, once experts serve several copies (batch 4 and up on the
  bench preset), one C++ loop that reads each chosen expert once (nanoseek.inference.expert_loop); for
  more copies, one opaque custom op computed as the eager MoE does;
- the output head of a step of few rows is one reduction per vocabulary row (`output_head`);
- finished rows are not dropped from the batch (a new batch size would be a new compilation).

Prefill stays eager (its length differs per call). The compiled step computes the same function as the
eager one; generated kernels may round differently in the last bits (e.g. a fused softmax sums in
another order), which greedy tests check does not change tokens. Without a C++ compiler (CPU) or Triton
(GPU) there is no inductor: `decode_steps` says so in one line and returns None (decode eagerly).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
import weakref

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from nanoseek.errors import warn
from nanoseek.inference.expert_loop import cpp_compiler, serves
from nanoseek.model.cache import CacheStep, CacheView, LatentKVCache
from nanoseek.model.moe import MoE, GroupedExperts, combine, dispatch

__all__ = ["DecodeSteps", "decode_steps", "static_length", "compiler_problem"]


def static_length(n: int) -> int:
    """Cache length for `n` slots, rounded up so that few distinct lengths (and compilations) occur:
    at least 128, then a multiple of 1/8 of the next power of two (at most 25% unused). Attention reads
    every slot of a static step, so unused slots cost time: a 160-slot generation in a 256-slot cache
    spent ~40% of its attention on them."""
    if n <= 128:
        return 128
    step = (1 << (n - 1).bit_length()) // 8
    return -(-n // step) * step


def compiler_problem(device: torch.device) -> str | None:
    """Why inductor cannot compile for `device` here, or None: CPU kernels are C++ (needs a C++ compiler),
    GPU kernels Triton (needs triton and a C compiler for its launcher)."""
    if device.type == "cpu":
        return None if cpp_compiler() else "no C++ compiler found (g++, clang++ or $CXX)"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        return None if any(shutil.which(n) for n in ("cc", "gcc", "clang")) else "no C compiler found (cc, gcc, clang)"
    return f"compiled decoding supports cpu and cuda, not {device.type}"


# ---------------------------------------------------------------------------------------------- routed experts
# The graph calls the experts through an int handle; the op looks the module up at run time.
_EXPERTS: weakref.WeakValueDictionary[int, GroupedExperts] = weakref.WeakValueDictionary()


@torch.library.custom_op("nanoseek::routed_experts", mutates_args=())
def routed_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, experts: int, few: bool) -> torch.Tensor:
    """sum_k weights[:, k] * expert_{idx[:, k]}(x) for x [N, D]: the eager MoE's own local computation
    (`GroupedExperts.per_expert` for few tokens on CPU, else dispatch -> grouped GEMM -> combine)."""
    module = _EXPERTS[experts]
    if few:
        return module.per_expert(x, weights, idx)
    rows, plan = dispatch(x, idx, module.down_proj.shape[0])
    return combine(module(rows, plan.offsets), plan, weights)


@routed_experts.register_fake
def _(x, weights, idx, experts, few):
    return torch.empty_like(x)


def gathered_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up_proj: torch.Tensor,
                     down_proj: torch.Tensor) -> torch.Tensor:
    """sum_k weights[:, k] * expert_{idx[:, k]}(x) for few tokens x [N, D], written as reductions over
    expert weights indexed by `idx`: inductor fuses index, multiply and sum into a few loops that read
    each chosen expert's rows in place (no gather copy, no per-expert matmul calls). It reads the
    weights once per token copy, so it is for small N * K only."""
    h = (x[:, None, None, :] * gate_up_proj[idx]).sum(-1)  # [N, K, 2I]
    gate, up = h.chunk(2, dim=-1)
    o = ((F.silu(gate) * up)[:, :, None, :] * down_proj[idx]).sum(-1)  # [N, K, D]
    return (weights.to(x.dtype)[:, :, None] * o).sum(1)


class _StepExperts:
    """The `MoE.expert_dispatcher` installed during a compiled step: few token copies (decoding) go
    through `expert_loop` (CPU, float32, one thread: nanoseek.inference.expert_loop) or else
    `gathered_experts`, fused into the graph; more through the `routed_experts` op (the eager MoE's own
    computation), so the graph has no data-dependent shapes or host reads either way."""

    def __init__(self, moe: MoE):
        self.moe, self.handle = moe, id(moe.experts)
        _EXPERTS[self.handle] = moe.experts

    def __call__(self, x, weights, idx, experts):
        if experts.grouped_mm is None and idx.numel() <= 4 * self.moe.cfg.n_routed_experts:
            if serves(x, idx, experts.gate_up_proj, experts.down_proj):  # CPU: each chosen expert read once
                return torch.ops.nanoseek.expert_loop(x, weights, idx, experts.gate_up_proj, experts.down_proj), None
            return gathered_experts(x, weights, idx, experts.gate_up_proj, experts.down_proj), None
        return torch.ops.nanoseek.routed_experts(x, weights, idx, self.handle, self.moe.few_tokens(x)), None


# ---------------------------------------------------------------------------------------------- the steps
def _view(kv: list[torch.Tensor], mask: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> CacheView:
    # start is unused by a static step (slots say where to write); a Python int here would be a guard.
    return CacheView(kv, CacheStep(0, positions, mask, slots=slots))


HEAD_ROWS = 8  # measured at 1 and 8 rows


def output_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """`model.lm_head(hidden)`. For the few rows of a CPU decode step (at most `HEAD_ROWS`), written as one
    reduction per vocabulary row over all the step's rows: inductor's loop then reads each row of the head
    once and uses it for every token. The head is the largest weight a step reads (4 MB on the bench
    preset) and no longer in cache when the step reaches it: MKL's 8 x 256 x 4096 GEMM then took 630-780 us
    (290 us with the weight in cache). Measured on the bench preset at batch 8: 127 steps 12% faster
    (0.549 -> 0.481 s CPU time); the same form for the other projections was no faster or slower."""
    head = model.lm_head
    rows = hidden.numel() // hidden.shape[-1]
    if hidden.device.type != "cpu" or rows > HEAD_ROWS or type(head) is not nn.Linear or head.bias is not None:
        return head(hidden)
    logits = (head.weight[:, None, :] * hidden.reshape(1, rows, -1)).sum(-1)  # [V, rows]
    return logits.t().reshape(*hidden.shape[:-1], -1)



def trunk_step(model, ids: torch.Tensor, kv: list[torch.Tensor], mask: torch.Tensor, positions: torch.Tensor,
               slots: torch.Tensor, last_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's forward over a reserved static step: (logits [B, 1 or T, V], final hidden [B, T, D])."""
    hidden = model.model(ids, cache=_view(kv, mask, positions, slots))
    return output_head(model, hidden[:, -1:] if last_only else hidden), hidden


def mtp_step(model, hidden: torch.Tensor, next_ids: torch.Tensor, kv: list[torch.Tensor], mask: torch.Tensor,
             positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """MTP module 1 over the same reserved step (speculative drafting): its hidden states [B, T, D]."""
    return model.mtp_hidden(1, hidden, next_ids, cache=_view(kv, mask, positions, slots))


_compiled: dict[str, object] = {}


def _compile(fn, device: torch.device):
    """`torch.compile` of a step function for CUDA: CUDA graphs replay a whole step as one launch."""
    key = f"{fn.__name__}:{device.type}"
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=False, fullgraph=True, mode="reduce-overhead")
    return _compiled[key]


class _Step(nn.Module):
    """`fn(model, *tensors, *static)` as a module (the model a submodule), so that
    `torch.func.functional_call` can run it with other weights: those the exported step receives."""

    def __init__(self, fn, model, static: tuple):
        super().__init__()
        self.fn, self.model, self.static = fn, model, static

    def forward(self, *tensors):
        return self.fn(self.model, *tensors, *self.static)


class _WeightsAsInputs(nn.Module):
    """What `torch.export` traces: the step with the model's weights as its first input, a dict by name."""

    def __init__(self, step: _Step):
        super().__init__()
        self.__dict__["step"] = step  # not a submodule: its weights must not become the export's own

    def forward(self, weights: dict[str, torch.Tensor], *tensors):
        return torch.func.functional_call(self.step, weights, tensors)


class _Packaged:
    """One step for one set of shapes, exported and compiled ahead of time by AOTInductor (CPU).

    Measured on the bench preset and not kept: max-autotune's C++ GEMMs (no faster than MKL here, compiles
    several times longer); kept: inductor's pass that turns one-row matmuls (batch-1 decoding) into
    reductions fused with their neighbours."""

    OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}

    def __init__(self, fn, model, tensors: tuple, static: tuple):
        step = _Step(fn, model, static)
        # Each weight is read from its module's own dict at every call, so a tensor replaced in its module
        # is seen. named_parameters drops tied duplicates; functional_call fills them in from their twin.
        self.slots = []
        for name, _ in [*step.named_parameters(), *step.named_buffers()]:
            owner, _, attr = name.rpartition(".")
            module = step.get_submodule(owner)
            self.slots.append((name, module._parameters if attr in module._parameters else module._buffers, attr))
        weights = {name: store[attr] for name, store, attr in self.slots}
        with torch.no_grad():
            program = torch.export.export(_WeightsAsInputs(step), (weights, *tensors), strict=False)
        with tempfile.TemporaryDirectory(prefix="nanoseek-step-") as tmp:  # loading copies the library out
            path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tmp, "step.pt2"),
                                                            inductor_configs=self.OPTIONS)
            # The loaded model's C++ runner, called with the flat list of inputs (weights in the order above,
            # then the tensors): the Python wrapper around it would rebuild its input and output
            # specifications from text at every call (~0.1 ms).
            self.run = torch._inductor.aoti_load_package(path).loader
        self.out_spec = pytree.treespec_loads(self.run.get_call_spec()[1])

    def __call__(self, tensors: tuple):
        flat = [store[attr] for _, store, attr in self.slots]
        for t in tensors:
            flat.extend(t) if isinstance(t, list) else flat.append(t)
        return pytree.tree_unflatten(self.run.boxed_run(flat), self.out_spec)


class DecodeSteps:
    """Static-shape decode and verify steps of one model, compiled on first use of each shape.

    `compile_seconds` accumulates the time of the calls that compiled (first call of each batch size,
    step length and cache length), so a benchmark can report it apart from decoding."""

    def __init__(self, model):
        self._model = weakref.ref(model)  # held in a WeakKeyDictionary keyed by the model
        self.device = model.model.embed_tokens.weight.device
        self.dispatchers = {moe: _StepExperts(moe) for moe in model.moe_layers() if moe.expert_dispatcher is None}
        self.graphs: dict[tuple, object] = {}  # step key -> its compiled form
        self.compile_seconds = 0.0
        self.failed = False

    def _build(self, fn, tensors: tuple, static: tuple):
        """The compiled form of `fn` for these shapes, called as `compiled(tensors)`."""
        if self.device.type == "cpu":
            return _Packaged(fn, self.model, tensors, static)
        graph = _compile(fn, self.device)
        return lambda tensors: graph(self.model, *tensors, *static)

    def _run(self, fn, key: tuple, tensors: tuple, static: tuple = ()):
        """`fn(model, *tensors, *static)` compiled. Tracing (and a CUDA graph's guards) run the model's Python,
        so the step's expert dispatchers are installed around it; an exported step runs none. On the first
        call of a shape, time it as compilation, and if compiling fails, say so once and stay eager for this
        model."""
        if key in self.graphs and isinstance(self.graphs[key], _Packaged):  # no Python of the model runs
            return self.graphs[key](tensors)
        for moe, op in self.dispatchers.items():
            moe.expert_dispatcher = op
        try:
            if self.failed:
                return fn(self.model, *tensors, *static)
            if key in self.graphs:
                return self.graphs[key](tensors)
            start = time.perf_counter()
            try:
                compiled = self._build(fn, tensors, static)
                out = compiled(tensors)
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, do not lose the step
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                warn(f"compiled decoding failed ({type(e).__name__}: {first[:200]}); decoding eagerly")
                self.failed = True
                return fn(self.model, *tensors, *static)
            self.compile_seconds += time.perf_counter() - start
            self.graphs[key] = compiled
            return out
        finally:
            for moe in self.dispatchers:
                moe.expert_dispatcher = None

    @property
    def model(self):
        return self._model()

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        """CUDA graphs reuse their output buffers at the next replay: copy what the caller keeps."""
        return t.clone() if self.device.type == "cuda" else t

    def _static(self, cache: LatentKVCache, n: int) -> tuple:
        if self.device.type == "cuda":  # CUDA graphs may only update buffers whose address never changes
            for kv in cache.kv_layers:
                torch._dynamo.mark_static_address(kv)
        step = cache.begin_static_step(n)
        return list(cache.kv_layers), step.mask, step.positions, step.slots

    def _key(self, name: str, x: torch.Tensor, cache: LatentKVCache, *static) -> tuple:
        return (name, *x.shape, x.dtype, cache.max_len, cache.dtype, len(cache.kv_layers), *static)

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
        """`next_token_logits` for one token per row [B, 1]: the logits [B, V] after appending it."""
        tensors = (ids, *self._static(cache, ids.shape[1]))
        logits, _ = self._run(trunk_step, self._key("trunk", ids, cache, True), tensors, (True,))
        return self._own(logits[:, -1])

    @torch.inference_mode()
    def verify(self, ids: torch.Tensor, cache: LatentKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk over [B, T] tokens, every position's logits: (logits [B, T, V], hidden [B, T, D])."""
        tensors = (ids, *self._static(cache, ids.shape[1]))
        logits, hidden = self._run(trunk_step, self._key("trunk", ids, cache, False), tensors, (False,))
        return self._own(logits), self._own(hidden)

    @torch.inference_mode()
    def mtp_hidden(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: LatentKVCache) -> torch.Tensor:
        """`model.mtp_hidden(1, hidden, next_ids, cache=cache)` over the step `verify` reserved."""
        step = cache.step
        tensors = (hidden, next_ids, list(cache.kv_layers), step.mask, step.positions, step.slots)
        return self._own(self._run(mtp_step, self._key("mtp", next_ids, cache), tensors))


_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_steps(model) -> DecodeSteps | None:
    """The model's compiled decode steps (made once per model), or None after a one-line notice when
    this machine cannot compile for the model's device."""
    device = model.model.embed_tokens.weight.device
    if (problem := compiler_problem(device)) is not None:
        warn(f"compile: {problem}; decoding eagerly")
        return None
    if model not in _steps:
        _steps[model] = DecodeSteps(model)
    return _steps[model]
