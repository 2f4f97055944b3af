"""The jitted train step: learning, gradient accumulation, bias rule, compile-once, donation."""

from __future__ import annotations

import jax
import numpy as np
import optax

from ling_jax.train.bias_update import load_ratio
from ling_jax.train.train_step import (
    init_train_state,
    merge_model,
    split_micro_batches,
)
from tests.train.conftest import packed_batch


def _bias_leaves(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state.expert_bias)]


def test_loss_decreases_and_metrics_are_consistent(tiny_train, tiny_train_step):
    batch = packed_batch(seed=0)
    state = tiny_train.fresh_state()
    history = []
    for _ in range(20):
        state, metrics = tiny_train_step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < first["loss"] - 1.0, (first["loss"], last["loss"])
    assert int(state.step) == 20
    # The loss includes the MTP and z-loss terms with their weights (z-loss weight 1e-3 here).
    for m in (first, last):
        assert m["z_loss"] > 0
        expected = (
            m["ce"] + tiny_train.model_cfg.mtp.loss_weight * m["mtp_loss"] + 1e-3 * m["z_loss"]
        )
        np.testing.assert_allclose(m["loss"], expected, rtol=1e-6)
    assert first["tokens"] == batch["loss_mask"].sum()
    assert first["lr"] == np.float32(tiny_train.optim_cfg.peak_lr)
    assert first["moe/max_load_ratio"] >= first["moe/mean_load_ratio"] >= 1.0
    assert set(first) >= {"grad_norm", "accuracy", "mtp/load_ratio", "moe/load_ratio/layer_1"}
    # The biases moved, and each layer's bias still sums to zero.
    for bias in _bias_leaves(state):
        assert np.abs(bias).max() > 0
        np.testing.assert_allclose(bias.sum(-1), 0.0, atol=1e-6)


def test_micro_batches_give_the_full_batch_gradient(tiny_train, tiny_train_step):
    batch = packed_batch(seed=1)
    full_step = tiny_train.jitted_step(micro_batches=1)
    full, full_metrics = full_step(tiny_train.fresh_state(), batch)
    micro, micro_metrics = tiny_train_step(tiny_train.fresh_state(), batch)
    for key, value in full_metrics.items():
        np.testing.assert_allclose(micro_metrics[key], value, rtol=2e-5, err_msg=key)
    # After one step Adam's first moment is (1 - b1) * clipped gradient: compare gradients.
    mu_full = optax.tree_utils.tree_get(full.opt_state, "mu")
    mu_micro = optax.tree_utils.tree_get(micro.opt_state, "mu")
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(mu_full))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
        mu_micro,
        mu_full,
    )
    # Adam's first step is lr * g / (|g| + eps): where |g| is near eps, rounding noise in g
    # moves the update by a visible fraction of lr, hence a tolerance relative to lr (the
    # first moments above are the precise gradient comparison).
    atol = 0.1 * tiny_train.optim_cfg.peak_lr
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=atol), micro.params, full.params
    )
    # Expert counts summed over both micro-batches: the same bias update.
    for a, b in zip(_bias_leaves(micro), _bias_leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bias_moves_only_by_the_sign_rule(tiny_train, tiny_train_step):
    state = tiny_train.fresh_state()
    before = _bias_leaves(state)
    new_state, _ = tiny_train_step(state, packed_batch(seed=2))
    rate = tiny_train.optim_cfg.bias_update_rate
    for old, new in zip(before, _bias_leaves(new_state), strict=True):
        delta = (new - old) / rate  # sign(e) - mean(sign(e)) for every layer
        np.testing.assert_allclose(delta.sum(-1), 0.0, atol=1e-4)
        steps = delta - delta.min(-1, keepdims=True)  # sign(e) - min sign: integers in {0, 1, 2}
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert steps.max() <= 2 + 1e-3 and np.abs(delta).max() > 0
    # No gradient and no optimizer state reach the bias.
    for tree in (new_state.params, new_state.opt_state):
        names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
        assert not any("expert_bias" in name for name in names)


def test_step_compiles_once(tiny_train, tiny_train_step):
    state = tiny_train.fresh_state()
    state, _ = tiny_train_step(state, packed_batch(seed=3))
    state, _ = tiny_train_step(state, packed_batch(seed=4))
    assert tiny_train_step._cache_size() == 1


def test_state_is_donated(tiny_train, tiny_train_step):
    # A state straight from `init_train_state`, as the trainer will pass it.
    _, state = init_train_state(
        merge_model(tiny_train.graphdef, tiny_train.fresh_state()), tiny_train.optimizer
    )
    leaves = jax.tree.leaves(state)
    new_state, _ = tiny_train_step(state, packed_batch(seed=5))
    assert all(leaf.is_deleted() for leaf in leaves)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))
    assert tiny_train_step._cache_size() == 1  # A freshly initialised state needs no retrace.


def test_eval_step_sums_match_the_train_metrics(tiny_train, tiny_train_step, tiny_eval_step):
    batch = packed_batch(seed=6)
    _, metrics = tiny_train_step(tiny_train.fresh_state(), batch)
    batch["target_bytes"] = np.full_like(batch["targets"], 2)
    sums = tiny_eval_step(tiny_train.initial_state, batch)
    np.testing.assert_allclose(sums["ce_sum"] / sums["tokens"], metrics["ce"], rtol=1e-5)
    np.testing.assert_allclose(
        sums["mtp_ce_sum"] / sums["mtp_tokens"], metrics["mtp_loss"], rtol=1e-5
    )
    np.testing.assert_allclose(sums["correct"] / sums["tokens"], metrics["accuracy"], rtol=1e-6)
    assert float(sums["target_bytes"]) == 2 * batch["loss_mask"].sum()


def test_micro_batches_are_strided_rows():
    batch = {"x": np.arange(8)[:, None] * np.ones((1, 3), np.int32)}
    split = split_micro_batches(batch, 2)["x"]
    assert split.shape == (2, 4, 3)
    np.testing.assert_array_equal(split[0, :, 0], [0, 2, 4, 6])
    np.testing.assert_array_equal(split[1, :, 0], [1, 3, 5, 7])


def test_load_ratio_metric_is_max_over_layers():
    np.testing.assert_allclose(load_ratio(np.array([[4.0, 0.0], [1.0, 1.0]])).max(), 2.0)
