from nanoseek.model.transformer import CausalLMOutput, DeepseekV3ForCausalLM

__all__ = ["DeepseekV3ForCausalLM", "CausalLMOutput"]
