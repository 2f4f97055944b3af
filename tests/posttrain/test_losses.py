"""GRPO / GSPO / LPO losses, reference KL and Evo-CoT shaping, on hand-checked small numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.posttrain import losses, rewards

PAUSE = 9  # The pause-punctuation token id of these tests.


def _random_batch(seed, batch=3, seq=6):
    rng = np.random.default_rng(seed)
    logp = jnp.asarray(rng.normal(-2.0, 0.5, (batch, seq)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0.0, 0.05, (batch, seq)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(batch,)), jnp.float32)
    return logp, old, adv


def test_grpo_token_ratios_hand_checked():
    old = jnp.zeros((1, 2))
    logp = jnp.log(jnp.array([[1.1, 0.5]]))
    mask = jnp.ones((1, 2))
    # A = +1: min(1.1, clip 1.1) = 1.1; min(0.5, clip 0.8) = 0.5 -> J = 0.8.
    loss, metrics = losses.grpo_loss(logp, old, jnp.array([1.0]), mask, eps=0.2)
    np.testing.assert_allclose(loss, -0.8, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_fraction"], 0.0)
    # A = -1: min(-1.1, -1.1) = -1.1; min(-0.5, -0.8) = -0.8 (clipped) -> J = -0.95.
    loss, metrics = losses.grpo_loss(logp, old, jnp.array([-1.0]), mask, eps=0.2)
    np.testing.assert_allclose(loss, 0.95, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_fraction"], 0.5)


def test_gspo_geometric_mean_hand_checked():
    # Token ratios 2 and 0.5: geometric mean 1, so the term is A itself; padding ignored.
    logp = jnp.log(jnp.array([[2.0, 0.5, 7.0]]))
    mask = jnp.array([[1.0, 1.0, 0.0]])
    loss, _ = losses.gspo_loss(logp, jnp.zeros((1, 3)), jnp.array([0.7]), mask)
    np.testing.assert_allclose(loss, -0.7, rtol=1e-6)


def test_lpo_sentences_hand_checked():
    tokens = jnp.array([[5, PAUSE, 7, 8]])
    np.testing.assert_array_equal(losses.sentence_ids(tokens, jnp.array([PAUSE])), [[0, 0, 1, 1]])
    # Sentence ratios 1.02 (inside the 0.03 clip) and 1.1 (clipped to 1.03 for A = 1):
    # J = (2 * 1.02 + 2 * 1.03) / 4 = 1.025; the clipped sentence gets no gradient.
    logp = jnp.log(jnp.array([[1.02, 1.02, 1.1, 1.1]]))
    mask = jnp.ones((1, 4))

    def loss_fn(logp):
        return losses.lpo_loss(logp, jnp.zeros((1, 4)), jnp.ones(1), mask, tokens, [PAUSE])[0]

    np.testing.assert_allclose(loss_fn(logp), -1.025, rtol=1e-6)
    grad = jax.grad(loss_fn)(logp)
    # d/dlogp_t of -(2/4) * exp(mean of 2) = -(2/4) * r * (1/2) = -r / 4 on the unclipped one.
    np.testing.assert_allclose(grad, [[-1.02 / 4, -1.02 / 4, 0.0, 0.0]], rtol=1e-5)


def test_lpo_one_sentence_equals_gspo():
    logp, old, adv = _random_batch(0)
    tokens = jnp.full(logp.shape, 5)  # No pause punctuation: one sentence per completion.
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], jnp.float32)
    eps = 0.03

    def lpo(logp):
        return losses.lpo_loss(logp, old, adv, mask, tokens, [PAUSE], eps=eps)[0]

    def gspo(logp, m=mask, aggregation="token_mean"):
        return losses.gspo_loss(logp, old, adv, m, eps=eps, aggregation=aggregation)[0]

    # Length-weighted (LPO's normalisation) GSPO: equal for any lengths, gradients too.
    np.testing.assert_allclose(lpo(logp), gspo(logp), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lpo)(logp), jax.grad(gspo)(logp), rtol=1e-5, atol=1e-8)
    # GSPO's own per-sequence mean agrees when all completions have the same length.
    full = jnp.ones_like(mask)
    lpo_full = losses.lpo_loss(logp, old, adv, full, tokens, [PAUSE], eps=eps)[0]
    np.testing.assert_allclose(lpo_full, gspo(logp, full, "sequence_mean"), rtol=1e-5)
    # ...and not when they differ (the test can tell the two normalisations apart).
    assert not np.isclose(lpo(logp), gspo(logp, mask, "sequence_mean"), rtol=1e-4)


def test_lpo_token_sentences_equal_grpo():
    logp, old, adv = _random_batch(1)
    tokens = jnp.full(logp.shape, PAUSE)  # Every token ends a sentence.
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], jnp.float32)

    def lpo(logp):
        return losses.lpo_loss(logp, old, adv, mask, tokens, [PAUSE], eps=0.03)[0]

    def grpo(logp):
        return losses.grpo_loss(logp, old, adv, mask, eps=0.03)[0]

    np.testing.assert_allclose(lpo(logp), grpo(logp), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lpo)(logp), jax.grad(grpo)(logp), rtol=1e-5, atol=1e-8)


def test_bad_aggregation_is_named():
    logp, old, adv = _random_batch(2)
    with pytest.raises(ValueError, match="aggregation"):
        losses.grpo_loss(logp, old, adv, jnp.ones_like(logp), aggregation="sum")


def test_group_advantages_and_reference_kl():
    adv = losses.group_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    np.testing.assert_allclose(adv, [[1, -1, -1, 1], [0, 0, 0, 0]], atol=1e-5)
    mask = jnp.array([[1.0, 0.0]])
    logp = jnp.array([[-1.0, -3.0]])
    assert float(losses.reference_kl(logp, logp, mask)) == 0.0
    # d = log 2: exp(d) - d - 1 = 1 - ln 2; the masked token does not count.
    kl = losses.reference_kl(logp, logp + jnp.array([[np.log(2.0), 5.0]]), mask)
    np.testing.assert_allclose(kl, 1.0 - np.log(2.0), rtol=1e-6)


def test_evo_cot_shaping_hand_checked():
    correct = np.array([[1, 1, 0]])
    lengths = np.array([[10, 20, 30]])
    # p = [0.5, 0, -0.5]; R_hat = [0.5, 0, -0.5]; think penalty on the third.
    r = rewards.evo_cot_rewards(correct, lengths, np.array([[0, 0, 1]]), alpha=0.1)
    np.testing.assert_allclose(r, [[1.05, 1.0, -0.55]], rtol=1e-6)
    # A short wrong reply earns nothing for its length: min(p, 0).
    r = rewards.length_shaping(np.array([[0, 1]]), np.array([[5, 9]]))
    np.testing.assert_allclose(r, [[0.0, -0.5]], atol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        rewards.evo_cot_rewards(correct, lengths[:, :2], np.zeros((1, 3)), alpha=0.1)


def test_correctness_reads_the_last_integer():
    replies = ["45 * 2 = 90; 37 + 90 = 127.", "so it is -3", "no idea"]
    np.testing.assert_array_equal(rewards.correctness(replies, [127, -3, 0]), [1.0, 1.0, 0.0])
