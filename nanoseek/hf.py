"""Hugging Face / DeepSeek checkpoint format: config.json + safetensors shards (+ index).

On disk we use DeepSeek's released layout, which `transformers` also reads:
  routed experts per expert  model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight
  MTP module k (0-based)     model.layers.{num_hidden_layers + k}.{enorm,hnorm,eh_proj,shared_head.norm,
                             self_attn.*, mlp.*, ...} plus copies of embed_tokens / shared_head.head
FP8 checkpoints (DeepSeek-V3's release) store E4M3 weights with a sibling `weight_scale_inv` holding one
scale per 128x128 block; they are dequantised on load.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.errors import UserError
from nanoseek.model import DeepseekV3ForCausalLM

FP8_BLOCK = 128
_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# Per-module copies of the shared embedding/head that DeepSeek stores in every MTP layer.
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


class CheckpointError(UserError):
    pass


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


# ---------------------------------------------------------------------------------------------- reading
def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    missing = [f for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{path}: shard {missing[0].name} listed in the index is missing")
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return files


def read_tensors(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, FP8 blocks dequantised, floats cast to `dtype`."""
    raw: dict[str, torch.Tensor] = {}
    for file in _shard_files(Path(path)):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                raw[key] = f.get_tensor(key)
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


def _drop_mtp_if_absent(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> ModelConfig:
    if cfg.num_nextn_predict_layers and not any(
            k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in tensors):
        warnings.warn(f"config declares num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the "
                      "checkpoint stores no MTP tensors (transformers does not save them): loading with MTP off",
                      stacklevel=3)
        return cfg.replace(num_nextn_predict_layers=0)
    return cfg


def load_state(model: DeepseekV3ForCausalLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`; one error naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    problems = []
    for key, t in expected.items():
        if key not in state:
            problems.append(f"missing {key} (expected shape {tuple(t.shape)})")
        elif tuple(state[key].shape) != tuple(t.shape):
            problems.append(f"{key}: checkpoint shape {tuple(state[key].shape)} != model shape {tuple(t.shape)}")
    problems += [f"unexpected {key} (shape {tuple(state[key].shape)})" for key in state if key not in expected]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{source} does not match the config: " + "; ".join(problems[:5]) + more)
    model.load_state_dict(state, strict=True)


def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu") -> DeepseekV3ForCausalLM:
    """Load a HF/DeepSeek-format directory (config.json + safetensors, sharded or not, BF16 or FP8).
    dtype: None keeps float32; router weights and the balancing bias always stay float32."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    cfg = ModelConfig.from_json(path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    tensors = read_tensors(path)
    cfg = _drop_mtp_if_absent(tensors, cfg)
    model = DeepseekV3ForCausalLM(cfg)
    load_state(model, from_checkpoint(tensors, cfg), str(path))
    return cast_model(model, dtype).to(device)


def cast_model(model: DeepseekV3ForCausalLM, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    """Cast to `dtype`, keeping the router (gate weight and bias) in float32 as DeepSeek does."""
    model.to(dtype)
    for moe in model.moe_layers():
        moe.gate.float()
    return model


# ---------------------------------------------------------------------------------------------- writing
def _atomic_save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, file)


def save_pretrained(model: DeepseekV3ForCausalLM, path: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write config.json + safetensors shards (+ index when more than one) in DeepSeek/HF layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = to_checkpoint(state, cfg)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        # safetensors refuses shared storage (expert slices, MTP copies of embedding/head): own copies.
        shards[-1][key] = tensors[key].clone()
        size += nbytes
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    cfg.replace(torch_dtype=dtype_name).save(path)
    if len(shards) == 1:
        _atomic_save(shards[0], path / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, path / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
