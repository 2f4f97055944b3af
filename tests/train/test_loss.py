"""Losses against a float64 numpy reference, with packed documents and padding."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.model.moe.layer import MoEStats
from ling_jax.model.transformer import LingOutput
from ling_jax.train import loss as loss_lib
from tests.train.conftest import packed_batch

VOCAB = 256


def _np_ce(logits, target) -> float:
    logits = np.asarray(logits, np.float64)
    m = logits.max()
    return float(m + np.log(np.exp(logits - m).sum()) - logits[target])


def reference_loss(logits, mtp_logits, z_layers, batch, mtp_weight, z_weight):
    """Position by position: main CE over loss_mask; MTP position t predicts targets[t + 1]
    only inside one document and one row; z-loss is a mean over non-padding tokens."""
    tgt, mask, seg = batch["targets"], batch["loss_mask"], batch["segment_ids"]
    rows, seq = tgt.shape
    ce = correct = n = mtp = n_mtp = 0.0
    for b in range(rows):
        for t in range(seq):
            if mask[b, t]:
                ce += _np_ce(logits[b, t], tgt[b, t])
                correct += float(np.argmax(logits[b, t]) == tgt[b, t])
                n += 1
            if t + 1 < seq and seg[b, t] != 0 and seg[b, t + 1] == seg[b, t] and mask[b, t + 1]:
                mtp += _np_ce(mtp_logits[b, t], tgt[b, t + 1])
                n_mtp += 1
    ce, mtp, z = ce / n, mtp / n_mtp, float(np.sum(z_layers))
    return {
        "loss": ce + mtp_weight * mtp + z_weight * z,
        "ce": ce,
        "mtp_loss": mtp,
        "z_loss": z,
        "tokens": n,
        "accuracy": correct / n,
    }


def _output(seed, batch_shape, z_moe=(0.7, 1.3), z_mtp=0.4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(*batch_shape, VOCAB)).astype(np.float32) * 3
    mtp_logits = rng.normal(size=(*batch_shape, VOCAB)).astype(np.float32) * 3
    stats = MoEStats(expert_counts=jnp.zeros((2, 16)), z_loss=jnp.asarray(z_moe, jnp.float32))
    mtp_stats = MoEStats(expert_counts=jnp.zeros(16), z_loss=jnp.asarray(z_mtp, jnp.float32))
    output = LingOutput(
        logits=jnp.asarray(logits),
        mtp_logits=jnp.asarray(mtp_logits),
        moe_stats=stats,
        mtp_stats=mtp_stats,
    )
    return output, logits, mtp_logits, [*z_moe, z_mtp]


@pytest.mark.parametrize("z_weight", [0.0, 1e-2])
def test_loss_matches_numpy_reference(z_weight):
    batch = packed_batch(seed=1)
    batch["loss_mask"][3, 4] = 0.0  # A masked target inside a document.
    output, logits, mtp_logits, z_layers = _output(0, batch["targets"].shape)
    _, metrics = loss_lib.compute_loss(output, batch, mtp_weight=0.1, z_loss_weight=z_weight)
    expected = reference_loss(logits, mtp_logits, z_layers, batch, 0.1, z_weight)
    for key, value in expected.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, err_msg=key)


def test_z_loss_term_is_added_with_its_weight():
    batch = packed_batch(seed=2)
    output, *_ = _output(1, batch["targets"].shape)
    loss0, m0 = loss_lib.compute_loss(output, batch, mtp_weight=0.1, z_loss_weight=0.0)
    loss1, m1 = loss_lib.compute_loss(output, batch, mtp_weight=0.1, z_loss_weight=0.5)
    np.testing.assert_allclose(float(m0["z_loss"]), 0.7 + 1.3 + 0.4, rtol=1e-6)
    np.testing.assert_allclose(float(loss1 - loss0), 0.5 * (0.7 + 1.3 + 0.4), rtol=1e-5)


def test_mtp_targets_stay_inside_documents_and_rows():
    batch = packed_batch(seed=3)
    targets, mask = loss_lib.mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"])
    targets, mask = np.asarray(targets), np.asarray(mask)
    seg = batch["segment_ids"]
    assert (mask[:, -1] == 0).all()  # The last position has no t + 2 in its row.
    np.testing.assert_array_equal(targets[:, :-1], batch["targets"][:, 1:])
    # Row 1 holds documents of 5 and 7 tokens then padding: positions 4 (last of doc 1) and 11
    # (last of doc 2) and the padding have no MTP target.
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 1, 0] + [1] * 6 + [0] * 5)
    assert not (mask * (seg == 0)).any()


def test_cross_entropy_is_stable_for_large_logits():
    logits = jnp.asarray([[[1e4, 0.0, -1e4]]], jnp.float32)
    ce, correct = loss_lib.token_cross_entropy(logits, jnp.asarray([[1]]))
    np.testing.assert_allclose(float(ce[0, 0]), 1e4, rtol=1e-6)
    assert not bool(correct[0, 0])


def test_empty_batch_gives_zero_not_nan():
    batch = packed_batch(seed=4)
    batch["loss_mask"][:] = 0.0
    batch["segment_ids"][:] = 0
    output, *_ = _output(2, batch["targets"].shape)
    loss, metrics = loss_lib.compute_loss(output, batch, mtp_weight=0.1, z_loss_weight=1.0)
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0
