"""Token selection: greedy rows, top-k / top-p masks, and per-row settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.infer import SamplingConfig, SamplingParams, filter_logits, sample

# Row probabilities 0.4, 0.3, 0.15, 0.1, 0.05 in a shuffled order.
PROBS = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
LOGITS = np.log(PROBS).astype(np.float32)


def kept(top_k: int, top_p: float) -> set[int]:
    out = filter_logits(jnp.asarray(LOGITS[None]), jnp.array([top_k]), jnp.array([top_p]))
    return set(np.flatnonzero(np.isfinite(np.asarray(out[0]))).tolist())


@pytest.mark.parametrize(
    "top_k, top_p, expected",
    [
        (0, 1.0, {0, 1, 2, 3, 4}),
        (1, 1.0, {1}),
        (2, 1.0, {1, 3}),
        (0, 0.4, {1}),  # The top token alone reaches 0.4.
        (0, 0.5, {1, 3}),  # 0.4 < 0.5 needs the second.
        (0, 0.86, {1, 3, 4, 0}),  # 0.85 < 0.86 needs the fourth.
        (3, 0.9, {1, 3, 4}),  # top-p over the renormalised top-3 (0.47, 0.35, 0.18).
        (3, 0.5, {1, 3}),
        (0, 1e-6, {1}),  # The first token always stays.
    ],
)
def test_filter_masks(top_k, top_p, expected):
    assert kept(top_k, top_p) == expected


def test_samples_respect_masks_and_greedy_rows():
    rows = [SamplingConfig(0.0), SamplingConfig(1.0, top_k=2), SamplingConfig(1.0, top_p=0.86)]
    params = SamplingParams(
        temperature=jnp.array([r.temperature for r in rows], jnp.float32),
        top_k=jnp.array([r.top_k for r in rows], jnp.int32),
        top_p=jnp.array([r.top_p for r in rows], jnp.float32),
    )
    logits = jnp.asarray(np.tile(LOGITS, (3, 1)))
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, params, k)))(keys))  # [2000, 3]
    assert (draws[:, 0] == 1).all()  # Greedy.
    assert set(draws[:, 1].tolist()) == {1, 3}
    assert set(draws[:, 2].tolist()) == {0, 1, 3, 4}
    # Frequencies follow the renormalised probabilities: 0.4 / 0.7 for the top-2 row.
    assert abs((draws[:, 1] == 1).mean() - 0.4 / 0.7) < 0.05
    assert abs((draws[:, 2] == 0).mean() - 0.1 / 0.95) < 0.04


def test_temperature_sharpens():
    params = SamplingParams.broadcast(SamplingConfig(temperature=0.25), 1)
    keys = jax.random.split(jax.random.key(1), 1000)
    draws = np.asarray(
        jax.jit(jax.vmap(lambda k: sample(jnp.asarray(LOGITS[None]), params, k)))(keys)
    )
    top = PROBS**4 / (PROBS**4).sum()
    assert abs((draws[:, 0] == 1).mean() - top[1]) < 0.05


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p")],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)
