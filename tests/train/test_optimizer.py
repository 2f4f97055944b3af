"""AdamW: the weight-decay mask, clipping, and what the optimizer sees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ling_jax.model.params import LAYERS_AXIS
from ling_jax.train.config import default_optim_config
from ling_jax.train.optimizer import make_optimizer, weight_decay_mask
from ling_jax.train.train_step import merge_model


def _paths(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_mask_matches_the_logical_axes(tiny_train):
    """False exactly for parameters with < 2 axes besides the stacked layer axis (norms)."""
    model = merge_model(tiny_train.graphdef, tiny_train.initial_state)
    variables = nnx.state(model, nnx.Param)
    expected = {}
    for path, var in jax.tree_util.tree_leaves_with_path(
        variables, is_leaf=lambda x: isinstance(x, nnx.Variable)
    ):
        axes = [a for a in var.get_metadata()["out_sharding"] if a != LAYERS_AXIS]
        expected[jax.tree_util.keystr(path)] = len(axes) >= 2
    got = _paths(weight_decay_mask(tiny_train.initial_state.params))
    assert got == expected
    no_decay = {name for name, decays in got.items() if not decays}
    assert no_decay == {name for name in got if "norm" in name}
    assert len(no_decay) >= 10  # norms of every kind, stacked ([L, d]) and not
    for name in ("['embed']", "['lm_head']", "['moe_layers']['blocks']['ffn']['experts']['up']"):
        assert got[name]


def test_expert_bias_is_not_in_the_optimizer_state(tiny_train):
    opt_state = tiny_train.initial_state.opt_state
    assert not any("expert_bias" in name for name in _paths(opt_state))
    mu = optax.tree_utils.tree_get(opt_state, "mu")
    assert jax.tree.structure(mu) == jax.tree.structure(tiny_train.initial_state.params)
    assert set(_paths(tiny_train.initial_state.expert_bias)) == {
        "['moe_layers']['blocks']['ffn']['router']['expert_bias']",
        "['mtp']['block']['ffn']['router']['expert_bias']",
    }


def test_mask_refuses_an_expert_bias():
    with pytest.raises(ValueError, match="expert bias"):
        weight_decay_mask({"router": {"expert_bias": jnp.zeros((2, 4))}})


def test_weight_decay_only_on_matrices_and_clipping():
    cfg = default_optim_config()
    lr = 0.5
    optimizer = make_optimizer(cfg, lambda step: lr)
    params = {
        "w": jnp.ones((2, 2)),
        "final_norm": {"scale": jnp.ones(2)},
        "blocks": {"input_norm": {"scale": jnp.ones((3, 2))}},  # stacked [layers, d]
    }
    state = optimizer.init(params)
    # Zero gradients: Adam's step is 0, so only the decoupled decay moves the parameters.
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], 1 - lr * cfg.weight_decay, rtol=1e-6)
    np.testing.assert_array_equal(new["final_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(new["blocks"]["input_norm"]["scale"], 1.0)
    # Global norm 20 is clipped to 1, so Adam's first moment is (1 - b1) * g / 20.
    grads = jax.tree.map(lambda p: jnp.zeros_like(p), params)
    grads["w"] = jnp.full((2, 2), 10.0)
    _, state = optimizer.update(grads, state, params)
    mu = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(mu["w"], (1 - cfg.b1) * 10.0 / 20.0, rtol=1e-6)
