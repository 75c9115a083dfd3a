"""State-dict adapter: our parameter names <-> the Hugging Face / DeepSeek checkpoint names.

Pure tensor mapping, no files (reading and writing directories is nanoseek.hf). On disk we use
DeepSeek's released layout, which `transformers` also reads:
  routed experts per expert  model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight
  MTP module k (0-based)     model.layers.{num_hidden_layers + k}.{enorm,hnorm,eh_proj,shared_head.norm,
                             self_attn.*, mlp.*, ...} plus copies of embed_tokens / shared_head.head
FP8 checkpoints (DeepSeek-V3's release) store E4M3 weights with a sibling `weight_scale_inv` holding one
scale per 128x128 block; they are dequantised on load.
"""

from __future__ import annotations

import re

import torch

from nanoseek.config import ModelConfig
from nanoseek.errors import UserError

FP8_BLOCK = 128
_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# Per-module copies of the shared embedding/head that DeepSeek stores in every MTP layer.
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


class CheckpointError(UserError):
    """A checkpoint that cannot be read into the model: missing, mis-named or mis-shaped tensors."""


# ---------------------------------------------------------------------------------------------- FP8
def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = W_fp8 * scale_inv, one scale per `block` x `block` tile (edge tiles may be partial)."""
    out_f, in_f = weight.shape
    expected = (-(-out_f // block), -(-in_f // block))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
                              f"for a {tuple(weight.shape)} weight in {block}x{block} blocks")
    compute = torch.promote_types(dtype, torch.float32)
    scale = scale_inv.to(compute).repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return (weight.to(compute) * scale).to(dtype)


def dequantize_checkpoint(raw: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Checkpoint tensors as read -> FP8 weights dequantised with their `weight_scale_inv` (which are
    dropped), other floats cast to `dtype`; the balancing bias keeps its own precision."""
    out = {}
    for key, t in raw.items():
        if key.endswith("weight_scale_inv"):
            continue
        scale = raw.get(key.removesuffix("weight") + "weight_scale_inv")
        if scale is not None:
            t = dequantize_fp8_blocks(t, scale, dtype=dtype)
        elif t.is_floating_point() and not key.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        out[key] = t
    return out


# ---------------------------------------------------------------------------------------------- key maps
def to_checkpoint(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> DeepSeek/HF names (experts split per expert, MTP as extra layers)."""
    out: dict[str, torch.Tensor] = {}
    L = cfg.num_hidden_layers
    for name, t in state.items():
        m = _MTP.match(name)
        if m:
            k, rest = int(m.group(1)), m.group(2)
            name = f"model.layers.{L + k}.{rest.removeprefix('block.')}"
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}.{e}.up_proj.weight"] = up[e]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    for k in range(cfg.num_nextn_predict_layers):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = state["model.embed_tokens.weight"]
        out[f"model.layers.{L + k}.shared_head.head.weight"] = state["lm_head.weight"]
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_checkpoint(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """DeepSeek/HF names -> our state dict. Accepts per-expert or fused (transformers) expert tensors."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    L = cfg.num_hidden_layers
    for name, t in tensors.items():
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= L:
            k, rest = int(m.group(1)) - L, m.group(2)
            if rest in _MTP_SHARED_COPIES:
                continue  # the model shares the main embedding and head
            own = rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head")
            name = f"mtp.{k}.{rest}" if own else f"mtp.{k}.block.{rest}"
        e = _EXPERTS.match(name)
        if e:
            experts.setdefault(e.group(1), {}).setdefault(int(e.group(2)), {})[e.group(3)] = t
            continue
        out[name] = t
    for prefix, per_expert in experts.items():
        n = max(per_expert) + 1
        try:
            out[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([per_expert[i]["gate_proj"], per_expert[i]["up_proj"]]) for i in range(n)])
            out[f"{prefix}.down_proj"] = torch.stack([per_expert[i]["down_proj"] for i in range(n)])
        except KeyError as err:
            raise CheckpointError(f"checkpoint is missing a tensor of {prefix}: expert/projection {err}") from None
    if cfg.tie_word_embeddings:
        out.setdefault("lm_head.weight", out.get("model.embed_tokens.weight"))
    return out


def has_mtp_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> bool:
    """Whether checkpoint-named `tensors` hold the MTP modules (layers after the trunk)."""
    return any(k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in tensors)
