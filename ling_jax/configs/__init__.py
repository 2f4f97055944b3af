"""Model configurations: the schema, its validation, and named presets."""

from ling_jax.configs.fields import set_fields
from ling_jax.configs.model_config import base_model_config, validate_model_config
from ling_jax.configs.presets import PRESETS, get_preset

__all__ = ["PRESETS", "base_model_config", "get_preset", "set_fields", "validate_model_config"]
