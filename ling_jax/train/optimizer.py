"""AdamW with global-norm clipping and weight decay masked off norms and biases (SPEC section 6).

The optimizer works on the pure (metadata-free) `nnx.Param` state of the model, as held by
`TrainState.params`; the fp32 expert biases are a separate `ExpertBias` collection that the
optimizer never sees (they follow the sign rule of `ling_jax.train.bias_update`).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from ling_jax.train.config import validate_optim_config

# Path components that mark a parameter as a norm scale or a bias, whatever its rank.
_NO_DECAY_MARKERS = ("norm", "bias")


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def weight_decay_mask(params: Any) -> Any:
    """True where AdamW's weight decay applies: the matrices (embeddings, projections, experts).

    False for norm scales and biases, found by a path component containing "norm" or "bias"
    (stacked layers give norm scales a leading "layers" axis, so the rank alone cannot tell
    them apart), and for any remaining parameter of rank < 2. `params` is a pytree of arrays
    (e.g. the pure `nnx.Param` state); returns a pytree of bools with the same structure.
    """

    def decays(path, leaf) -> bool:
        names = [_key_name(k).lower() for k in path]
        if any("expert_bias" in name for name in names):
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} is an expert bias: the optimizer must "
                "only see nnx.Param state (split the model with nnx.Param, ExpertBias)"
            )
        if any(marker in name for name in names for marker in _NO_DECAY_MARKERS):
            return False
        return leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    optim_cfg: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) then AdamW(schedule, b1, b2, eps, weight_decay, mask).

    Weight decay is decoupled and scaled by the learning rate (PyTorch / Megatron AdamW).
    """
    cfg = validate_optim_config(optim_cfg)
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask,
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
