"""The DeepSeek-V3 model as a pure nn.Module (no file I/O, no generation loop): see transformer.py."""

from nanoseek.model.cache import CacheStep, LatentKVCache
from nanoseek.model.transformer import CausalLMOutput, DeepseekV3ForCausalLM

__all__ = ["DeepseekV3ForCausalLM", "CausalLMOutput", "LatentKVCache", "CacheStep"]
