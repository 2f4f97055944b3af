"""Shared tiny-model fixtures: build and randomise once per session (compile time dominates)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ling_jax.configs import get_preset
from ling_jax.model import LingForCausalLM
from ling_jax.model.params import ExpertBias


def randomize(model: LingForCausalLM, seed: int = 0, scale: float = 0.3) -> None:
    """Gives every parameter and expert bias distinct random values (norm scales around 1).

    Random norm scales and biases catch mixed-up tensors that ones and zeros would hide.
    Drawn with numpy: one XLA random kernel per shape would cost a compile each.
    """
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Any(nnx.Param, ExpertBias))
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    new = []
    for path, leaf in paths_and_leaves:
        noise = rng.standard_normal(leaf.shape)
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            value = 1.0 + 0.2 * noise
        elif "expert_bias" in name:
            value = 0.05 * noise
        else:
            value = scale * noise / np.sqrt(leaf.shape[-2] if leaf.ndim >= 2 else 1)
        new.append(jnp.asarray(value, leaf.dtype))
    nnx.update(model, jax.tree.unflatten(treedef, new))


def tiny_config(**moe_overrides):
    cfg = get_preset("tiny")
    for key, value in moe_overrides.items():
        cfg.moe[key] = value
    return cfg


@pytest.fixture(scope="session")
def tiny_model() -> LingForCausalLM:
    model = nnx.jit(lambda: LingForCausalLM(tiny_config(), rngs=nnx.Rngs(0)))()
    randomize(model)
    return model


@pytest.fixture(scope="session")
def packed_batch():
    """Two rows: one plain sequence, one holding two packed documents and padding."""
    seq = 12
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, 256, size=(2, seq)).astype(np.int32)
    segment_ids = np.array([[1] * seq, [1] * 5 + [2] * 5 + [0] * 2], np.int32)
    positions = np.array([list(range(seq)), list(range(5)) + list(range(5)) + [0, 0]], np.int32)
    return input_ids, positions, segment_ids
