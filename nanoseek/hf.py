"""Model directories in the Hugging Face / DeepSeek format: the one place that reads and writes them.

A directory holds config.json, generation_config.json, safetensors shards (+ model.safetensors.index.json
when there are several) and, for models trained here, the tokenizer files. `transformers` loads such a
directory as it is. Tensor names are mapped by nanoseek.model.state_dict_adapter; this module only moves
them between files and the model.

MTP weights: transformers does not know the MTP module, so a directory that went through it (or through
TRL, which saves with it) has none. Loading such a directory turns MTP off with one warning line; the
model then generates normally but cannot draft speculatively, and MTP training starts from scratch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException

from nanoseek.config import ModelConfig
from nanoseek.data.tokenizer import Tokenizer, load_tokenizer
from nanoseek.dcp_safe import UnsafeCheckpointError, is_sharded, read_failure, read_model_tensors
from nanoseek.device import resolve_device
from nanoseek.errors import SettingError, UserError, warn
from nanoseek.files import atomic_write, write_json
from nanoseek.fp8.checkpoint import QUANTIZATION_CONFIG, quantize_checkpoint
from nanoseek.model import DeepseekV3ForCausalLM
from nanoseek.model.state_dict_adapter import (CheckpointError, dequantize_checkpoint, from_checkpoint,
                                               has_mtp_tensors, to_checkpoint)

#: What `tokenizer_files` copies along with a model so the directory is self-contained.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = ("float32", "bfloat16", "float16")

__all__ = ["CheckpointError", "model_directory", "read_tensors", "load_state", "load_weights", "from_pretrained",
           "cast_model", "torch_dtype", "tokenizer_files", "special_token_ids", "load_model_and_tokenizer",
           "save_pretrained"]


# ---------------------------------------------------------------------------------------------- reading
def model_directory(path: str | Path) -> Path:
    """`path` as a model directory, or one clear error saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a model directory (config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a model directory")
    return path


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: shard {missing[0].name} listed in the index is missing")
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return files


def read_tensors(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (checkpoint names), FP8 blocks dequantised, floats cast to
    `dtype`. A truncated or corrupt shard is one clear `CheckpointError`. A training checkpoint
    (`out_dir/checkpoints/step_*`: config.json + DCP shards of any layout) reads the same way."""
    if is_sharded(Path(path)):
        return _read_training_checkpoint(Path(path), dtype)
    raw: dict[str, torch.Tensor] = {}
    for file in _shard_files(Path(path)):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    raw[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file, truncated or corrupt ({e})") from None
    return dequantize_checkpoint(raw, dtype)


def _read_training_checkpoint(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    try:
        state = read_model_tensors(path)
    except (UnsafeCheckpointError, CheckpointException, OSError) as e:
        raise CheckpointError(f"training checkpoint {path}: {read_failure(e)}") from None
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return to_checkpoint(state, ModelConfig.from_json(path))


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


def load_weights(model: DeepseekV3ForCausalLM, path: str | Path) -> None:
    """Read a model directory's weights into an existing model (same config)."""
    load_state(model, from_checkpoint(read_tensors(path), model.config), str(path))


def _without_absent_mtp(tensors: dict[str, torch.Tensor], cfg: ModelConfig, path: Path) -> ModelConfig:
    if cfg.num_nextn_predict_layers and not has_mtp_tensors(tensors, cfg):
        warn(f"{path} holds no MTP weights although config.json declares num_nextn_predict_layers="
             f"{cfg.num_nextn_predict_layers} (transformers and TRL do not save them): loaded with MTP off")
        return cfg.replace(num_nextn_predict_layers=0)
    return cfg


def torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """None -> float32; a name from DTYPES -> the torch dtype; anything else is a SettingError."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SettingError(f"invalid setting `dtype` = {dtype!r}: must be one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu",
                    model_class: type[DeepseekV3ForCausalLM] = DeepseekV3ForCausalLM) -> DeepseekV3ForCausalLM:
    """Load a HF/DeepSeek-format directory (config.json + safetensors, sharded or not, BF16 or FP8) as
    `model_class`. dtype: None keeps float32; router weights and the balancing bias always stay float32.
    A directory without MTP weights loads with MTP off (one warning line)."""
    path = model_directory(path)
    cfg = ModelConfig.from_json(path)
    dtype = torch_dtype(dtype)
    device = resolve_device(device) if isinstance(device, str) else device
    tensors = read_tensors(path)
    cfg = _without_absent_mtp(tensors, cfg, path)
    model = model_class(cfg)
    load_state(model, from_checkpoint(tensors, cfg), str(path))
    return cast_model(model, dtype).to(device)


def cast_model(model: DeepseekV3ForCausalLM, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    """Cast to `dtype`, keeping the router (gate weight and bias) in float32 as DeepSeek does."""
    model.to(dtype)
    for moe in model.moe_layers():
        moe.gate.float()
    return model


# ---------------------------------------------------------------------------------------------- tokenizer
def tokenizer_files(directory: str | Path) -> dict[str, Path]:
    """The tokenizer files (TOKENIZER_FILES) that exist in `directory`, by name: what `save_pretrained`
    copies so a model directory is self-contained. Empty when there is no tokenizer."""
    d = Path(directory)
    return {name: d / name for name in TOKENIZER_FILES if (d / name).is_file()}


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The config fields transformers reads to start, stop and pad generation."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def load_model_and_tokenizer(model_dir: str | Path, tokenizer_dir: str | Path | None = None,
                             dtype: torch.dtype | str | None = "float32", device: str | torch.device = "cpu",
                             model_class: type[DeepseekV3ForCausalLM] = DeepseekV3ForCausalLM):
    """(model, tokenizer) from a model directory holding its tokenizer (or `tokenizer_dir`: a directory
    with tokenizer.json, or the file), with one clear error for each way the pair can be unusable.
    Settings, config and tokenizer are checked before the weights are read."""
    path = model_directory(model_dir)
    dtype = torch_dtype(dtype)
    device = resolve_device(device) if isinstance(device, str) else device
    cfg = ModelConfig.from_json(path)
    tok_path = Path(tokenizer_dir) if tokenizer_dir else path
    if tokenizer_dir and not tok_path.exists():
        raise UserError(f"tokenizer {tok_path} does not exist")
    if tok_path.is_dir() and not (tok_path / "tokenizer.json").is_file():
        hint = "" if tokenizer_dir else "; pass the tokenizer's directory (--tokenizer DIR)"
        raise UserError(f"no tokenizer.json in {tok_path}{hint}")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                        f"{cfg.vocab_size}: they do not belong together")
    model = from_pretrained(path, dtype=dtype, device=device, model_class=model_class)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- writing
def _save_shard(tensors: dict[str, torch.Tensor], file: Path) -> None:
    atomic_write(file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def save_config(cfg: ModelConfig, path: str | Path, tokenizer_files: dict[str, Path] | None = None) -> ModelConfig:
    """Everything of a model directory but the weights: config.json, generation_config.json and the
    tokenizer files (copied in; the tokenizer's bos / eos / pad ids go into both configs, so transformers'
    `generate` stops at our eos). Returns the config as written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = dict(tokenizer_files or {})
    if "tokenizer.json" in files:
        cfg = cfg.replace(**special_token_ids(load_tokenizer(files["tokenizer.json"])))
    cfg.save(path)
    write_json(path / "generation_config.json", {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                                                  "pad_token_id": cfg.pad_token_id})
    for name, src in files.items():
        atomic_write(path / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    return cfg


def save_pretrained(model: DeepseekV3ForCausalLM, path: str | Path, max_shard_bytes: int = 2 * 1024**3,
                    tokenizer_files: dict[str, Path] | None = None, fp8: bool = False) -> Path:
    """Write config.json, generation_config.json and safetensors shards (+ index when more than one) in
    DeepSeek/HF layout. `tokenizer_files` (see `tokenizer_files()`) are copied in, and the tokenizer's
    bos / eos / pad ids go into both configs, so transformers' `generate` stops at our eos.
    `fp8`: projection weights in DeepSeek's FP8 format (nanoseek.fp8.checkpoint)."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    cfg = save_config(model.config.replace(torch_dtype=dtype_name), path, tokenizer_files)
    tensors = to_checkpoint(state, cfg)
    if fp8:
        tensors = quantize_checkpoint(tensors)
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
    if fp8:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        write_json(path / "config.json", {**config, "quantization_config": QUANTIZATION_CONFIG})
    if len(shards) == 1:
        _save_shard(shards[0], path / "model.safetensors")
        return path
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_shard(shard, path / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(path / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return path
