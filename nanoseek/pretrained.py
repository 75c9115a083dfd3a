"""The user-facing model: `nanoseek.DeepseekV3ForCausalLM` = the pure nn.Module of nanoseek.model plus
the conveniences a transformers user expects, `generate`, `save_pretrained` and `from_pretrained`.

    import nanoseek
    model = nanoseek.from_pretrained("runs/small/model").eval()
    out = model.generate(input_ids, max_new_tokens=32)
    model.save_pretrained("copy")

It sits above the model, the file I/O (nanoseek.hf) and the generation loop (nanoseek.inference), so
none of those has to import upwards; nanoseek's own code calls those functions directly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek import hf
from nanoseek.inference.engine import hf_generate
from nanoseek.model import transformer


class DeepseekV3ForCausalLM(transformer.DeepseekV3ForCausalLM):
    """`nanoseek.model.DeepseekV3ForCausalLM` with `generate`, `save_pretrained` and `from_pretrained`."""

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """transformers-style generation over the latent KV cache; returns prompt + new ids [B, P + new].
        Options (temperature, top_k, top_p, min_p, attention_mask, eos_token_id, stop_strings, seed,
        speculative, ...): `nanoseek.inference.engine.hf_generate`."""
        return hf_generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, path: str | Path, safe_max_shard_bytes: int = 2 * 1024**3,
                        tokenizer_files: dict[str, Path] | None = None) -> Path:
        """Write a HF/DeepSeek-format directory (see `nanoseek.hf.save_pretrained`)."""
        return hf.save_pretrained(self, path, max_shard_bytes=safe_max_shard_bytes, tokenizer_files=tokenizer_files)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu") -> "DeepseekV3ForCausalLM":
        """Load a HF/DeepSeek-format directory (see `nanoseek.hf.from_pretrained`)."""
        return hf.from_pretrained(path, dtype=dtype, device=device, model_class=cls)


def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu") -> DeepseekV3ForCausalLM:
    """Load a HF/DeepSeek-format model directory (config.json + safetensors, BF16 or FP8). A directory
    without MTP weights (saved by transformers or TRL, which drop them) loads with MTP off and one
    warning line: it generates normally but cannot draft speculatively."""
    return DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, device=device)


def load_model_and_tokenizer(model_dir: str | Path, tokenizer_dir: str | Path | None = None,
                             dtype: torch.dtype | str | None = "float32", device: str | torch.device = "cpu"):
    """(model, tokenizer) from a model directory (see `nanoseek.hf.load_model_and_tokenizer`)."""
    return hf.load_model_and_tokenizer(model_dir, tokenizer_dir, dtype, device, model_class=DeepseekV3ForCausalLM)
