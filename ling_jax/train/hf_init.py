"""Starting a run from a Hugging Face checkpoint directory (`checkpoint.init_from`).

A directory with config.json and safetensors files (e.g. a released Ling-mini-2.0, or one
written by `ling_jax.convert.hf`) gives the run's initial parameters and expert biases, as a
snapshot of another run does (`ling_jax.train.merge.initialize_weights_from`). Every stored
tensor must match the run's model; a layer the checkpoint lacks is allowed only for the MTP
layer (released chat models ship without one), which keeps its fresh initialisation.
"""

from __future__ import annotations

import glob
import os

import jax
from absl import logging
from flax import nnx

from ling_jax.convert.hf import load_hf_state, pretrained_config
from ling_jax.convert.hf_io import CONFIG_FILE


def is_hf_checkpoint(path: str) -> bool:
    """Whether `path` is a local folder with config.json and at least one safetensors file."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and bool(
        glob.glob(os.path.join(path, "*.safetensors"))
    )


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def initialize_weights_from_hf(path: str, state, shardings):
    """`state` (a `TrainState`) with the params and expert biases of the HF checkpoint `path`,
    cast to the state's dtypes and laid out by `shardings`; step, optimizer state and data
    position stay fresh. Raises ValueError naming a tensor whose shape differs or that is
    missing (outside the MTP layer)."""
    config = pretrained_config(path, dtype="float32")
    loaded = {
        _key(p): v
        for p, v in jax.tree_util.tree_leaves_with_path(
            nnx.to_pure_dict(load_hf_state(path, config))
        )
    }

    def pick(key_path, fresh):
        key = _key(key_path)
        if key not in loaded:
            if key.startswith("mtp/"):
                return fresh
            raise ValueError(f"checkpoint.init_from={path!r}: no tensor for {key!r}")
        value = loaded[key]
        if value.shape != fresh.shape:
            raise ValueError(
                f"checkpoint.init_from={path!r}: {key!r} has shape {value.shape}, "
                f"the run's model expects {fresh.shape}"
            )
        return value.astype(fresh.dtype)

    params = jax.tree_util.tree_map_with_path(pick, state.params)
    expert_bias = jax.tree_util.tree_map_with_path(pick, state.expert_bias)
    missing_mtp = [
        k
        for k in (_key(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params))
        if k.startswith("mtp/") and k not in loaded
    ]
    if missing_mtp:
        logging.info("%s has no MTP layer: it keeps its fresh initialisation", path)
    return state.replace(
        params=jax.device_put(params, shardings.params),
        expert_bias=jax.device_put(expert_bias, shardings.expert_bias),
    )
