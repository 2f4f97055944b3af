"""Router selection, gate weights, dispatch/combine and the MoE layer against plain numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ling_jax.model.moe.dispatch import combine, sort_by_expert
from ling_jax.model.moe.layer import MoE
from ling_jax.model.moe.router import expert_token_counts, route
from tests.model import numpy_reference
from tests.model.conftest import randomize, tiny_config


@pytest.mark.parametrize("score_function", ["sigmoid", "softmax"])
def test_routing_matches_reference(score_function):
    cfg = tiny_config(score_function=score_function)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, cfg.moe.num_experts)).astype(np.float32) * 2
    bias = (rng.normal(size=cfg.moe.num_experts) * 0.3).astype(np.float32)
    routing = route(jnp.asarray(logits), jnp.asarray(bias), cfg.moe)
    for t in range(64):
        experts, gate = numpy_reference.route_one(logits[t].astype(np.float64), bias, cfg.moe)
        np.testing.assert_array_equal(routing.expert_index[t], experts)
        np.testing.assert_allclose(routing.gate_weight[t], gate, rtol=1e-5)


def test_group_limit_excludes_a_strong_expert_in_a_weak_group():
    """Expert 0 has the single best score, but its group's top-2 sum ranks last."""
    cfg = tiny_config()  # 16 experts, 4 groups of 4, keep 2 groups, top-4
    logits = np.full((1, 16), -4.0, np.float32)
    logits[0, 0] = 5.0  # group 0: one strong expert, the rest weak
    logits[0, 4:8] = [2.0, 2.0, 1.9, 1.8]  # group 1: uniformly good
    logits[0, 8:12] = [1.5, 1.5, 1.4, 1.4]  # group 2: uniformly fair
    routing = route(jnp.asarray(logits), None, cfg.moe)
    assert set(np.asarray(routing.expert_index[0]).tolist()) == {4, 5, 6, 7}
    cfg.moe.topk_group = cfg.moe.n_group  # no group limit: the strong expert gets in
    routing = route(jnp.asarray(logits), None, cfg.moe)
    assert 0 in np.asarray(routing.expert_index[0]).tolist()


def test_ties_break_to_the_lower_index():
    cfg = tiny_config()
    routing = route(jnp.zeros((1, 16), jnp.float32), None, cfg.moe)
    # All scores equal: groups 0 and 1 win, and within them experts 0..3.
    np.testing.assert_array_equal(routing.expert_index[0], [0, 1, 2, 3])
    np.testing.assert_allclose(routing.gate_weight[0], [2.5 / 4] * 4, rtol=1e-6)


def test_bias_selects_but_does_not_weight():
    cfg = tiny_config()
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    bias = jnp.zeros(16).at[15].set(100.0)
    routing = route(logits, bias, cfg.moe)
    assert (np.asarray(routing.expert_index) == 15).any(axis=1).all()
    scores = jax.nn.sigmoid(logits)
    picked = jnp.take_along_axis(scores, routing.expert_index, axis=-1)
    expected = 2.5 * picked / picked.sum(-1, keepdims=True)
    np.testing.assert_allclose(routing.gate_weight, expected, rtol=1e-6)
    np.testing.assert_allclose(routing.gate_weight.sum(-1), 2.5, rtol=1e-6)


def test_token_counts_respect_the_mask():
    index = jnp.array([[0, 1], [1, 2], [3, 1]])
    counts = expert_token_counts(index, 5, jnp.array([True, False, True]))
    np.testing.assert_array_equal(counts, [1, 2, 0, 1, 0])


def test_dispatch_and_combine_with_uneven_and_empty_groups():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    index = jnp.array([[4, 0], [4, 2], [0, 4], [2, 4], [4, 0], [0, 2]])  # experts 1, 3 empty
    rows, dispatch = sort_by_expert(x, index, 5)
    np.testing.assert_array_equal(dispatch.group_sizes, [4, 0, 3, 0, 5])
    flat = np.asarray(index).reshape(-1)
    np.testing.assert_array_equal(np.sort(flat), flat[np.asarray(dispatch.sort_order)])
    np.testing.assert_array_equal(rows, np.asarray(x)[np.asarray(dispatch.sort_order) // 2])
    # An "expert" that doubles its rows, combined with weights, gives sum_k w_k * 2x.
    weights = jnp.asarray(rng.uniform(size=(6, 2)), jnp.float32)
    out = combine(rows * 2.0, weights, dispatch)
    np.testing.assert_allclose(out, 2.0 * np.asarray(x) * weights.sum(-1)[:, None], rtol=1e-6)


@pytest.mark.parametrize("backend", ["xla", "ragged_dot", "pallas"])
def test_moe_layer_matches_reference(backend):
    cfg = tiny_config(backend=backend)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    randomize(layer)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, cfg.hidden_size)).astype(np.float32)
    mask = np.ones((2, 5), bool)
    y, stats = nnx.jit(lambda m, x, mask: m(x, mask))(layer, jnp.asarray(x), jnp.asarray(mask))
    params = {
        "router": layer.router.kernel[...],
        "expert_bias": layer.router.expert_bias[...],
        "experts_gate": layer.experts.gate[...],
        "experts_up": layer.experts.up[...],
        "experts_down": layer.experts.down[...],
        "shared_gate": layer.shared_expert.gate[...],
        "shared_up": layer.shared_expert.up[...],
        "shared_down": layer.shared_expert.down[...],
    }
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    ref, counts = numpy_reference.moe_ffn(x.reshape(10, -1).astype(np.float64), params, cfg)
    np.testing.assert_allclose(y.reshape(10, -1), ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(stats.expert_counts, counts)
    logsumexp = jax.nn.logsumexp(x.reshape(10, -1) @ params["router"], axis=-1)
    np.testing.assert_allclose(stats.z_loss, np.mean(np.asarray(logsumexp) ** 2), rtol=1e-4)
