"""FP8 checkpoints in DeepSeek-V3's released format (what `nanoseek.model.state_dict_adapter` reads back).

Every projection weight (`*_proj.weight`: attention, dense FFN, shared and routed experts, the MTP
module's eh_proj) is stored as float8_e4m3fn with a float32 sibling `*_proj.weight_scale_inv` holding one
dequantisation scale per 128 x 128 block (partial blocks at the edges of a dimension that is not a
multiple of 128, as DeepSeek's format has them); config.json carries `quantization_config`. The
embedding, output head, router gate, norms and the balancing bias keep their dtype, as in DeepSeek's files.
"""

from __future__ import annotations

import torch

from nanoseek.fp8.quantize import TILE, quantize_blocks

QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [TILE, TILE]}


def is_fp8_weight(name: str, tensor: torch.Tensor) -> bool:
    """Whether a checkpoint tensor is stored in FP8 (a 2-D projection weight)."""
    return name.endswith("_proj.weight") and tensor.dim() == 2 and tensor.is_floating_point()


def quantize_checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors -> the same with projection weights in FP8 + `weight_scale_inv`."""
    out = {}
    for name, t in tensors.items():
        if is_fp8_weight(name, t):
            q, scale = quantize_blocks(t)
            out[name] = q
            out[name.removesuffix("weight") + "weight_scale_inv"] = scale
        else:
            out[name] = t
    return out
