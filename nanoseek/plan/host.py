"""Host-side costs of a training step: what a CPU pays in line and a GPU hides.

A GPU runs kernels from an asynchronous queue: while one kernel runs, Python, the dispatcher and
autograd prepare the next, so for large models their cost hides behind the kernels (not modelled on
GPUs; `Cluster.host` is None there). A CPU does everything on the same core, one after the other,
so a small model's step also pays, per step:

- framework overhead: every op torch dispatches (forward, autograd's backward, optimizer) costs a
  fixed time whatever its size: ops x the measured cost per op (`HostCosts.op_s`);
- the optimizer as torch runs it on CPU: `torch.optim.AdamW` without foreach or fused kernels loops
  over the parameter tensors and makes one pass per elementary op (see `ADAMW_ACCESSES`), not the
  single read-modify-write of a fused kernel the GPU plan assumes; plus the gradient-norm clipping.

The op counts are nanoseek's: the ops its implementation dispatches per block, counted once with a
`TorchDispatchMode` on the tiny preset and its variants (tests/test_plan.py recounts them on real
models, so a change to the model code that moves them fails the test). They do not depend on batch
size, sequence length, the number of experts or top-k (the routed experts are one grouped GEMM; only
toy widths that grouped_mm cannot align fall back to one matmul per expert, and decoding a handful of
tokens takes the per-expert path: neither happens in the training steps these counts are for)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanoseek.cost.models import as_dict

# Ops dispatched per micro-batch (forward + backward), per block of nanoseek's DeepSeek-V3 model with
# every feature the presets use (q LoRA, one shared expert, group-limited routing, sequence-wise
# balance loss); features a config lacks remove their ops.
OPS_FIXED = 69            # embedding, rotary tables, final norm, output head, loss, loss sum
OPS_DENSE_LAYER = 340     # MLA (with q LoRA) + dense SwiGLU FFN + 2 norms + residuals
OPS_MOE_LAYER = 461       # MLA (with q LoRA) + router + dispatch/grouped GEMMs/combine + shared expert
OPS_MTP_EXTRA = 142       # an MTP module's norms, concat, eh_proj, shared head and loss, besides its layer
OPS_NO_Q_LORA = -38       # a layer with one q_proj instead of q_a_proj + norm + q_b_proj
OPS_NO_SHARED = -35       # a MoE layer without a shared expert
OPS_NO_GROUPS = -10       # a MoE layer without group-limited routing (n_group <= 1)
OPS_NO_BALANCE_LOSS = -35  # a MoE layer without the sequence-wise balance loss (aux_loss_alpha = 0)
# Ops per optimizer step: AdamW per parameter tensor, gradient clipping, bias update per MoE layer.
OPS_PER_PARAM_TENSOR = 10
OPS_CLIP = 11  # nanoseek.parallel.fsdp.clip_grad_norm: one foreach norm, the sum, the scaling
OPS_BALANCE_PER_MOE_LAYER = 14

# torch.optim.AdamW's single-tensor loop (the CPU default), fp32 accesses per parameter element:
# p.mul_(1 - lr wd) 2, m.lerp_(g) 3, v.mul_(b2) 2, v.addcmul_(g, g) 3, v.sqrt() 2, / bias correction 2,
# .add_(eps) 2, p.addcdiv_(m, denom) 4 = 20; the gradient's first read by clip_grad_norm_ + the clip's
# g.mul_(coef) 2 = 3 more.
ADAMW_ACCESSES = 20
CLIP_ACCESSES = 3


@dataclass(frozen=True)
class HostCosts:
    """Machine constants of the host-side costs, measured by `nanoseek plan --calibrate`."""
    op_s: float  # seconds per dispatched op (framework, dispatcher and autograd overhead)
    source: str = "measured by nanoseek plan --calibrate"


def _moe_layer(c: dict[str, Any], i: int) -> bool:
    return bool(c.get("n_routed_experts")) and i >= c.get("first_k_dense_replace", 0) \
        and i % (c.get("moe_layer_freq") or 1) == 0


def _layers(c: dict[str, Any], include_mtp: bool) -> list[bool]:
    """MoE flag of every decoder layer, MTP modules' layers last."""
    n = c["num_hidden_layers"]
    mtp = c.get("num_nextn_predict_layers", 0) if include_mtp else 0
    return [_moe_layer(c, i) for i in range(n + mtp)]


def ops_per_micro_batch(model: Any, include_mtp: bool = True) -> int:
    """Ops nanoseek dispatches for one micro-batch's forward and backward (see the module docstring)."""
    c = dict(as_dict(model))
    layers = _layers(c, include_mtp)
    ops = OPS_FIXED + OPS_MTP_EXTRA * (len(layers) - c["num_hidden_layers"])
    for moe in layers:
        ops += OPS_MOE_LAYER if moe else OPS_DENSE_LAYER
        ops += 0 if c.get("q_lora_rank") else OPS_NO_Q_LORA
        if moe:
            ops += 0 if c.get("n_shared_experts") else OPS_NO_SHARED
            ops += 0 if (c.get("n_group") or 1) > 1 else OPS_NO_GROUPS
            ops += 0 if c.get("aux_loss_alpha", 0) > 0 else OPS_NO_BALANCE_LOSS
    return ops


def parameter_tensors(model: Any, include_mtp: bool = True) -> int:
    """nanoseek's parameter tensors: embedding, final norm, head; per layer 2 norms, the attention's
    q_proj (or q_a_proj, its norm, q_b_proj), kv_a_proj, kv_a norm, kv_b_proj, o_proj, and a dense
    FFN's 3 projections or a MoE's router, 2 grouped expert tensors and 3 per shared-expert FFN;
    an MTP module's 2 input norms, eh_proj and head norm."""
    c = dict(as_dict(model))
    layers = _layers(c, include_mtp)
    n = 3 + 4 * (len(layers) - c["num_hidden_layers"])
    for moe in layers:
        n += 2 + (3 if c.get("q_lora_rank") else 1) + 4
        n += (3 + 3 * bool(c.get("n_shared_experts"))) if moe else 3
    return n


def ops_per_step(model: Any, n_micro: int = 1, include_mtp: bool = True) -> int:
    """Every op of one optimizer step: the micro-batches, clipping, AdamW, the bias update."""
    moe_layers = sum(_layers(dict(as_dict(model)), include_mtp))
    return (n_micro * ops_per_micro_batch(model, include_mtp) + OPS_CLIP
            + OPS_PER_PARAM_TENSOR * parameter_tensors(model, include_mtp) + OPS_BALANCE_PER_MOE_LAYER * moe_layers)


def host_seconds(model: Any, host: HostCosts, n_micro: int, params: float, bandwidth: float,
                 include_mtp: bool = True) -> dict[str, float]:
    """Per step: the framework overhead of every op and the optimizer as torch runs it on CPU (AdamW's
    single-tensor loop and gradient clipping over `params` fp32 elements at `bandwidth` bytes/s)."""
    ops = ops_per_step(model, n_micro, include_mtp)
    return {"ops": ops, "framework_s": ops * host.op_s,
            "optimizer_s": params * 4 * (ADAMW_ACCESSES + CLIP_ACCESSES) / bandwidth}
