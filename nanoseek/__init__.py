"""nanoseek: DeepSeek-V3 and R1 in miniature.

`nanoseek.DeepseekV3ForCausalLM`, `nanoseek.from_pretrained` and `nanoseek.load_model_and_tokenizer` come
from nanoseek.pretrained; they are imported on first use so that `import nanoseek` (and the CLI's
`--help`) does not pay for importing torch.
"""

from nanoseek.config import ModelConfig, preset

__version__ = "0.1.0"

_LAZY = ("DeepseekV3ForCausalLM", "from_pretrained", "load_model_and_tokenizer")


def __getattr__(name):
    if name in _LAZY:
        from nanoseek import pretrained  # deferred: torch is heavy (see the module docstring)

        return getattr(pretrained, name)
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")


__all__ = ["ModelConfig", "preset", "from_pretrained", "load_model_and_tokenizer", "DeepseekV3ForCausalLM"]
