"""The zero-mean sign update of the expert biases (SPEC 5.1)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ling_jax.train.bias_update import (
    expert_bias_variables,
    load_ratio,
    update_expert_biases,
    zero_mean_sign_update,
)
from ling_jax.train.train_step import merge_model


def test_hand_computed_example():
    # counts 10, 2, 4, 0 -> mean 4 -> e = -6, 2, 0, 4 -> sign -1, 1, 0, 1 (mean 1/4)
    # delta = -1.25, 0.75, -0.25, 0.75
    bias = jnp.asarray([0.5, -0.5, 0.25, -0.25], jnp.float32)
    counts = jnp.asarray([10.0, 2.0, 4.0, 0.0])
    new = zero_mean_sign_update(bias, counts, 0.1)
    expected = np.array([0.5 - 0.125, -0.5 + 0.075, 0.25 - 0.025, -0.25 + 0.075])
    np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-6)
    assert new.dtype == jnp.float32


def test_stacked_layers_are_independent_and_sum_stays_zero():
    rng = np.random.default_rng(0)
    counts = jnp.asarray(rng.integers(0, 50, size=(3, 16)), jnp.float32)
    bias = jnp.zeros((3, 16), jnp.float32)
    for _ in range(5):
        bias = zero_mean_sign_update(bias, counts, 1e-3)
    np.testing.assert_allclose(np.asarray(bias.sum(-1)), 0.0, atol=1e-6)
    for layer in range(3):
        single = jnp.zeros(16)
        for _ in range(5):
            single = zero_mean_sign_update(single, counts[layer], 1e-3)
        np.testing.assert_allclose(bias[layer], single, atol=1e-7)
    # Underloaded experts (below the mean) go up, overloaded ones go down.
    under = counts < counts.mean(-1, keepdims=True)
    over = counts > counts.mean(-1, keepdims=True)
    assert (bias[under] > 0).all() and (bias[over] < 0).all()


def test_balanced_load_leaves_bias_unchanged():
    bias = jnp.asarray([0.1, -0.1, 0.0])
    np.testing.assert_array_equal(zero_mean_sign_update(bias, jnp.full(3, 7.0), 1.0), bias)


def test_load_ratio():
    np.testing.assert_allclose(load_ratio(jnp.asarray([[1.0, 3.0], [2.0, 2.0]])), [1.5, 1.0])
    assert float(load_ratio(jnp.zeros(4))) == 0.0


def test_update_model_biases_in_place(tiny_train):
    model = merge_model(tiny_train.graphdef, tiny_train.initial_state)
    variables = expert_bias_variables(model)
    assert variables["moe"].shape == (2, 16) and variables["mtp"].shape == (16,)
    counts = {"moe": jnp.arange(32.0).reshape(2, 16), "mtp": 16.0 - jnp.arange(16.0)}
    update_expert_biases(model, counts, 0.5)
    np.testing.assert_allclose(
        model.moe_layers.blocks.ffn.router.expert_bias[...],
        zero_mean_sign_update(jnp.zeros((2, 16)), counts["moe"], 0.5),
    )
    mtp_bias = np.asarray(model.mtp.block.ffn.router.expert_bias[...])
    assert (mtp_bias[:8] < 0).all() and (mtp_bias[8:] > 0).all()  # expert 0 is busiest
    # The shared initial state is untouched.
    assert not np.asarray(
        tiny_train.initial_state.expert_bias["mtp"]["block"]["ffn"]["router"]["expert_bias"]
    ).any()
