"""Model presets: the three released Ling 2.0 sizes (SPEC section 1) and tiny test shapes.

Each preset is a plain function returning a fresh, validated model config. The released sizes
carry one MTP layer, as they were trained; the published parameter counts exclude it (use
`count_params(config, include_mtp=False)` to reproduce them).
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from ling_jax.configs.model_config import base_model_config, validate_model_config


def ling_mini_2() -> ml_collections.ConfigDict:
    """Ling-mini-2.0: 16.26B total, 1.43B active."""
    cfg = base_model_config()
    cfg.hidden_size = 2048
    cfg.num_layers = 20
    cfg.num_attention_heads = 16
    cfg.num_kv_heads = 4
    cfg.intermediate_size = 5120
    cfg.first_k_dense_replace = 1
    cfg.moe.expert_intermediate_size = 512
    cfg.moe.shared_expert_intermediate_size = 512
    return validate_model_config(cfg)


def ling_flash_2() -> ml_collections.ConfigDict:
    """Ling-flash-2.0: 102.9B total, 6.15B active."""
    cfg = base_model_config()
    cfg.hidden_size = 4096
    cfg.num_layers = 32
    cfg.num_attention_heads = 32
    cfg.num_kv_heads = 4
    cfg.intermediate_size = 9216
    cfg.first_k_dense_replace = 1
    cfg.moe.expert_intermediate_size = 1024
    cfg.moe.shared_expert_intermediate_size = 1024
    return validate_model_config(cfg)


def ling_1t() -> ml_collections.ConfigDict:
    """Ling-1T: 999.7B total, 51.1B active; four leading dense layers."""
    cfg = base_model_config()
    cfg.hidden_size = 8192
    cfg.num_layers = 80
    cfg.num_attention_heads = 64
    cfg.num_kv_heads = 8
    cfg.intermediate_size = 18432
    cfg.first_k_dense_replace = 4
    cfg.moe.expert_intermediate_size = 2048
    cfg.moe.shared_expert_intermediate_size = 2048
    return validate_model_config(cfg)


def tiny() -> ml_collections.ConfigDict:
    """A Ling-shaped model that compiles in seconds on a CPU (SPEC section 12 protocol)."""
    cfg = base_model_config()
    cfg.vocab_size = 256
    cfg.hidden_size = 64
    cfg.num_layers = 3
    cfg.num_attention_heads = 4
    cfg.num_kv_heads = 2
    cfg.head_dim = 16
    cfg.intermediate_size = 128
    cfg.first_k_dense_replace = 1
    cfg.max_position_embeddings = 512
    cfg.rope.theta = 10000.0
    cfg.moe.num_experts = 16
    cfg.moe.num_experts_per_tok = 4
    cfg.moe.n_group = 4
    cfg.moe.topk_group = 2
    cfg.moe.expert_intermediate_size = 32
    cfg.moe.shared_expert_intermediate_size = 32
    cfg.dtype = "float32"
    cfg.init_std = 0.02
    return validate_model_config(cfg)


def tiny_no_mtp() -> ml_collections.ConfigDict:
    """`tiny` without the MTP layer, as released chat checkpoints are."""
    cfg = tiny()
    cfg.mtp.num_layers = 0
    return validate_model_config(cfg)


PRESETS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "ling_mini_2": ling_mini_2,
    "ling_flash_2": ling_flash_2,
    "ling_1t": ling_1t,
    "tiny": tiny,
    "tiny_no_mtp": tiny_no_mtp,
}


def get_preset(name: str) -> ml_collections.ConfigDict:
    """Returns a fresh copy of the named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()
