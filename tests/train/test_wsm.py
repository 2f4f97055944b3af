"""WSM merge weights: the SPEC section 8 table, the inverse formula and the forward check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ling_jax.train.wsm import (
    decay_factors,
    emulated_decay,
    merge_weights,
    weights_from_decay,
)

# SPEC section 8, k = 8 (9 snapshots), to three decimals.
SPEC_TABLE = {
    "linear": [0.111] * 9,
    "cosine": [0.030, 0.087, 0.133, 0.163, 0.174, 0.163, 0.133, 0.087, 0.030],
    "1-sqrt": [0.333, 0.138, 0.106, 0.089, 0.079, 0.071, 0.065, 0.061, 0.057],
}


@pytest.mark.parametrize("shape", sorted(SPEC_TABLE))
def test_spec_table(shape):
    np.testing.assert_allclose(merge_weights(9, shape), SPEC_TABLE[shape], atol=5e-4)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt", lambda x: (1 - x) ** 2])
@pytest.mark.parametrize("num_snapshots", [1, 2, 5, 9, 32])
def test_weights_sum_to_one_and_recover_the_decay(shape, num_snapshots):
    c = merge_weights(num_snapshots, shape)
    assert c.shape == (num_snapshots,) and np.all(c >= 0)
    assert math.isclose(c.sum(), 1.0, rel_tol=1e-12)
    k = num_snapshots - 1
    np.testing.assert_allclose(emulated_decay(c), decay_factors(num_snapshots, shape), atol=1e-12)
    if callable(shape):
        expected = [shape(i / (k + 1)) for i in range(1, k + 1)]
        np.testing.assert_allclose(emulated_decay(c), expected, atol=1e-12)


def test_uniform_mean_is_linear_decay_and_aliases():
    c = merge_weights(9, "mean")
    np.testing.assert_allclose(c, np.full(9, 1 / 9))
    np.testing.assert_allclose(emulated_decay(c), 1 - np.arange(1, 9) / 9)
    np.testing.assert_array_equal(merge_weights(4, "uniform"), merge_weights(4, "linear"))


def test_inverse_formula_and_random_decays():
    np.testing.assert_allclose(weights_from_decay([0.75, 0.5, 0.25]), [0.25] * 4)
    np.testing.assert_allclose(weights_from_decay([1.0, 1.0]), [0.0, 0.0, 1.0])  # no decay
    np.testing.assert_allclose(weights_from_decay([0.0, 0.0]), [1.0, 0.0, 0.0])  # all decay
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = np.sort(rng.uniform(size=7))[::-1]
        c = weights_from_decay(w)
        assert math.isclose(c.sum(), 1.0) and np.all(c >= 0)
        np.testing.assert_allclose(emulated_decay(c), w, atol=1e-12)


@pytest.mark.parametrize(
    "decay, match",
    [([0.5, 0.7], "non-increasing"), ([1.2, 0.5], r"\[0, 1\]"), ([0.5, -0.1], r"\[0, 1\]")],
)
def test_unreachable_decays_are_refused(decay, match):
    with pytest.raises(ValueError, match=match):
        weights_from_decay(decay)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown WSM decay shape 'exp'"):
        merge_weights(4, "exp")
    with pytest.raises(ValueError, match="num_snapshots"):
        merge_weights(0)
    with pytest.raises(ValueError, match="sum to 1"):
        emulated_decay([0.5, 0.2])
