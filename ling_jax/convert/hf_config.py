"""`config.json` of the HF BailingMoeV2 model <-> the model config (SPEC sections 1 and 3).

Each HF key maps onto one explicit field of `ling_jax.configs.base_model_config()`:

  hidden_size, num_hidden_layers -> num_layers, num_attention_heads, num_key_value_heads ->
  num_kv_heads, head_dim, intermediate_size, first_k_dense_replace, max_position_embeddings,
  vocab_size, rms_norm_eps, tie_word_embeddings, initializer_range -> init_std,
  torch_dtype -> param_dtype (the dtype the weights are stored in),
  rope_theta -> rope.theta, partial_rotary_factor -> rope.partial_rotary_factor,
  rope_scaling -> rope.scaling (null or YaRN: factor, original_max_position_embeddings,
  beta_fast, beta_slow, attention_factor -> mscale), use_qk_norm -> attention.use_qk_norm,
  num_experts, num_shared_experts, num_experts_per_tok, n_group, topk_group,
  routed_scaling_factor, score_function, norm_topk_prob -> moe.*,
  moe_intermediate_size -> moe.expert_intermediate_size,
  moe_shared_expert_intermediate_size -> moe.shared_expert_intermediate_size * num_shared_experts,
  moe_router_enable_expert_bias -> moe.use_expert_bias,
  num_nextn_predict_layers -> mtp.num_layers, mtp_loss_scaling_factor -> mtp.loss_weight.

`moe_shared_expert_intermediate_size` is the total width of the shared experts (Megatron's
convention); ours is per shared expert. The HF remote code ignores the key and uses
`moe_intermediate_size * num_shared_experts`, the same value in every released model.
config.json names no `auto_map`: transformers has no BailingMoeV2 class, and the remote code
it would point at is not in an exported folder unless `hf_export.add_remote_code` copies it.
Fields with no HF key (compute dtype, layer scanning, remat, MoE backend) keep their defaults;
`moe.group_score_topk` must be 2, the value the HF router hard-codes. `router_dtype` is not
read: the router math is always fp32, as in the HF model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from ling_jax.configs.model_config import DTYPES, base_model_config, validate_model_config

ARCHITECTURE = "BailingMoeV2ForCausalLM"
MODEL_TYPES = ("bailing_moe", "bailing_moe_v2")

# HF key -> field, for the keys copied as they are. Keys handled by hand are listed below.
_DIRECT = {
    "hidden_size": ("hidden_size", int),
    "num_hidden_layers": ("num_layers", int),
    "num_attention_heads": ("num_attention_heads", int),
    "num_key_value_heads": ("num_kv_heads", int),
    "intermediate_size": ("intermediate_size", int),
    "first_k_dense_replace": ("first_k_dense_replace", int),
    "max_position_embeddings": ("max_position_embeddings", int),
    "vocab_size": ("vocab_size", int),
    "rms_norm_eps": ("rms_norm_eps", float),
    "initializer_range": ("init_std", float),
    "rope_theta": ("rope.theta", float),
    "partial_rotary_factor": ("rope.partial_rotary_factor", float),
    "use_qk_norm": ("attention.use_qk_norm", bool),
    "num_experts": ("moe.num_experts", int),
    "num_experts_per_tok": ("moe.num_experts_per_tok", int),
    "moe_intermediate_size": ("moe.expert_intermediate_size", int),
    "routed_scaling_factor": ("moe.routed_scaling_factor", float),
    "score_function": ("moe.score_function", str),
    "norm_topk_prob": ("moe.norm_topk_prob", bool),
    "moe_router_enable_expert_bias": ("moe.use_expert_bias", bool),
    "num_nextn_predict_layers": ("mtp.num_layers", int),
    "mtp_loss_scaling_factor": ("mtp.loss_weight", float),
}
# Keys that fix the tensor layout: a config.json without them cannot be read reliably.
_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "first_k_dense_replace",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)
# field -> HF key, to name the HF key when validation rejects a value.
_FIELD_TO_HF = (
    {field: key for key, (field, _) in _DIRECT.items()}
    | {
        "head_dim": "head_dim",
        "param_dtype": "torch_dtype",
        "tie_word_embeddings": "tie_word_embeddings",
        "moe.n_group": "n_group",
        "moe.topk_group": "topk_group",
        "moe.num_shared_experts": "num_shared_experts",
        "moe.shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
    }
    | {
        f"rope.scaling.{k}": f"rope_scaling.{k}"
        for k in ("factor", "original_max_position_embeddings")
    }
)
_YARN_KEYS = frozenset(
    ("type", "rope_type", "factor", "original_max_position_embeddings")
    + ("beta_fast", "beta_slow", "attention_factor")
)


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"HF config.json key `{key}` = {value!r} is unsupported: expected {expected}")


def _convert(key: str, value: Any, kind: type) -> Any:
    """A JSON value as `kind`; strings are never parsed as numbers, nor numbers as booleans."""
    if kind is bool or kind is str:
        ok = isinstance(value, kind)
    elif isinstance(value, bool):
        ok = False
    elif kind is int:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    else:
        ok = isinstance(value, (int, float))
    if not ok:
        raise _bad(key, value, f"a JSON value of type {kind.__name__}")
    return kind(value)


def _set(cfg: ml_collections.ConfigDict, field: str, value: Any) -> None:
    *sections, name = field.split(".")
    for section in sections:
        cfg = cfg[section]
    cfg[name] = value


def _get(cfg: ml_collections.ConfigDict, field: str) -> Any:
    for part in field.split("."):
        cfg = cfg[part]
    return cfg


def _require_value(hf: Mapping[str, Any], key: str, allowed: tuple, expected: str) -> None:
    """An optional key that, when present, must hold one of `allowed`."""
    if key in hf and hf[key] not in allowed:
        raise _bad(key, hf[key], expected)


def _check_supported(hf: Mapping[str, Any]) -> None:
    architectures = hf.get("architectures")
    if architectures is not None and ARCHITECTURE not in architectures:
        raise _bad("architectures", architectures, f"a list holding {ARCHITECTURE!r}")
    _require_value(hf, "model_type", MODEL_TYPES, f"one of {MODEL_TYPES}")
    for key in ("use_bias", "use_qkv_bias"):
        _require_value(hf, key, (False, None), "false (Ling 2.0 linears have no bias)")
    _require_value(hf, "tie_word_embeddings", (False, None), "false (Ling 2.0 unties the lm head)")
    _require_value(hf, "hidden_act", ("silu",), "'silu' (SwiGLU)")
    _require_value(hf, "use_rmsnorm", (True,), "true")
    _require_value(hf, "norm_head", (False,), "false (no normalised lm head)")
    _require_value(hf, "use_sliding_window", (False,), "false (full attention)")
    _require_value(hf, "num_nextn_predict_layers", (0, 1, None), "0 or 1")
    missing = [key for key in _REQUIRED if hf.get(key) is None]
    if missing:
        raise ValueError(f"HF config.json lacks required key(s) {missing}")
    if hf.get("first_k_dense_replace", 0) and hf.get("intermediate_size") is None:
        raise ValueError("HF config.json lacks `intermediate_size`, needed by the dense layers")


def _rope_scaling_from_hf(cfg: ml_collections.ConfigDict, scaling: Any) -> None:
    if scaling is None:
        cfg.rope.scaling.type = "none"
        return
    if not isinstance(scaling, Mapping):
        raise _bad("rope_scaling", scaling, "null or a YaRN dict")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        cfg.rope.scaling.type = "none"
        return
    if kind != "yarn":
        raise _bad("rope_scaling.rope_type", kind, "'yarn' (or rope_scaling null)")
    unknown = sorted(set(scaling) - _YARN_KEYS)
    if unknown:
        raise _bad(
            f"rope_scaling.{unknown[0]}", scaling[unknown[0]], f"only keys {sorted(_YARN_KEYS)}"
        )
    if "factor" not in scaling:
        raise ValueError("HF config.json key `rope_scaling` lacks `factor`")
    s = cfg.rope.scaling
    s.type = "yarn"
    s.factor = float(scaling["factor"])
    s.original_max_position_embeddings = int(
        scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
    )
    s.beta_fast = float(scaling.get("beta_fast", s.beta_fast))
    s.beta_slow = float(scaling.get("beta_slow", s.beta_slow))
    if scaling.get("attention_factor") is not None:
        s.mscale = float(scaling["attention_factor"])


def _validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    try:
        return validate_model_config(cfg)
    except ValueError as e:
        match = re.search(r"field `([\w.]+)`", str(e))
        key = _FIELD_TO_HF.get(match.group(1)) if match else None
        if key is None:
            raise
        raise ValueError(f"HF config.json key `{key}`: {e}") from e


def config_from_hf(hf: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Builds a validated model config from the dict of a BailingMoeV2 `config.json`.

    Raises ValueError naming the HF key for a missing size, an unsupported architecture feature
    (biases, tied embeddings, a non-SiLU activation, non-YaRN RoPE scaling) or an invalid value.
    """
    if not isinstance(hf, Mapping):
        raise ValueError(f"HF config must be a JSON object, got {type(hf).__name__}")
    _check_supported(hf)
    cfg = base_model_config()
    for key, (field, kind) in _DIRECT.items():
        if hf.get(key) is not None:
            _set(cfg, field, _convert(key, hf[key], kind))
    # As in the HF config class, a missing head_dim means hidden_size / num_attention_heads.
    head_dim = hf.get("head_dim")
    cfg.head_dim = int(head_dim or cfg.hidden_size // cfg.num_attention_heads)
    cfg.tie_word_embeddings = bool(hf.get("tie_word_embeddings", False))
    dtype = hf.get("torch_dtype", hf.get("dtype"))  # transformers >= 4.56 writes `dtype`
    if dtype is not None:
        if dtype not in DTYPES:
            raise _bad("torch_dtype", dtype, f"one of {DTYPES}")
        cfg.param_dtype = dtype
    moe = cfg.moe
    # A null n_group disables group-limited routing, which one group expresses.
    moe.n_group = int(hf.get("n_group") or 1)
    moe.topk_group = int(hf.get("topk_group") or moe.n_group)
    moe.num_shared_experts = int(hf.get("num_shared_experts") or 0)
    shared_total = hf.get("moe_shared_expert_intermediate_size")
    if moe.num_shared_experts:
        if shared_total is None:
            shared_total = moe.expert_intermediate_size * moe.num_shared_experts
        if shared_total % moe.num_shared_experts:
            raise _bad(
                "moe_shared_expert_intermediate_size",
                shared_total,
                f"a multiple of num_shared_experts={moe.num_shared_experts}",
            )
        moe.shared_expert_intermediate_size = int(shared_total) // moe.num_shared_experts
    rotary_dim = hf.get("rotary_dim")  # written by some exporters; must agree with the factor
    if rotary_dim is not None and rotary_dim != int(cfg.head_dim * cfg.rope.partial_rotary_factor):
        raise _bad("rotary_dim", rotary_dim, "head_dim * partial_rotary_factor")
    if cfg.first_k_dense_replace == 0 and hf.get("intermediate_size") is None:
        cfg.intermediate_size = 0
    _rope_scaling_from_hf(cfg, hf.get("rope_scaling"))
    return _validate(cfg)


def config_to_hf(
    config: ml_collections.ConfigDict, torch_dtype: str | None = None
) -> dict[str, Any]:
    """The `config.json` dict of `config`; `torch_dtype` defaults to `config.param_dtype`.

    Raises ValueError for a config the HF model cannot express (`moe.group_score_topk` != 2).
    """
    validate_model_config(ml_collections.ConfigDict(config))
    moe, rope = config.moe, config.rope
    if moe.group_score_topk != 2:
        raise ValueError(
            f"model config field `moe.group_score_topk` = {moe.group_score_topk} has no HF "
            "equivalent: the BailingMoeV2 router always ranks groups by their top-2 scores"
        )
    rope_scaling = None
    if rope.scaling.type == "yarn":
        rope_scaling = {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": rope.scaling.factor,
            "original_max_position_embeddings": rope.scaling.original_max_position_embeddings,
            "beta_fast": rope.scaling.beta_fast,
            "beta_slow": rope.scaling.beta_slow,
        }
        if rope.scaling.mscale is not None:
            rope_scaling["attention_factor"] = rope.scaling.mscale
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "bailing_moe",
    }
    hf |= {key: _get(config, field) for key, (field, _) in _DIRECT.items()}
    hf |= {
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "use_bias": False,
        "use_qkv_bias": False,
        "use_rmsnorm": True,
        "tie_word_embeddings": False,
        "rope_scaling": rope_scaling,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        # The HF model builds a shared expert whenever this is not null, so 0 is written as null.
        "num_shared_experts": moe.num_shared_experts or None,
        "moe_shared_expert_intermediate_size": (
            moe.num_shared_experts * moe.shared_expert_intermediate_size or None
        ),
        "router_dtype": "fp32",
        "torch_dtype": torch_dtype or config.param_dtype,
    }
    return hf
