"""nanoseek: DeepSeek-V3 and R1 in miniature."""

from nanoseek.config import ModelConfig, preset

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device="cpu"):
    """Load a Hugging Face / DeepSeek-format model directory. See `nanoseek.hf.from_pretrained`."""
    from nanoseek.hf import from_pretrained as _load

    return _load(path, dtype=dtype, device=device)


def __getattr__(name):
    if name == "DeepseekV3ForCausalLM":
        from nanoseek.model import DeepseekV3ForCausalLM

        return DeepseekV3ForCausalLM
    raise AttributeError(name)


__all__ = ["ModelConfig", "preset", "from_pretrained", "DeepseekV3ForCausalLM"]
