"""The Ling 2.0 model in Flax NNX."""

from ling_jax.model.counting import count_params, flops_per_token
from ling_jax.model.transformer import LingForCausalLM, LingOutput

__all__ = ["LingForCausalLM", "LingOutput", "count_params", "flops_per_token"]
