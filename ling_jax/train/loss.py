"""Training losses: next-token CE, MTP CE and the router z-loss (SPEC sections 4.5, 5.2).

    L = CE_main + w_mtp * CE_mtp + w_z * sum over routers of z_router

Each term is a mean over its own valid tokens (Megatron: sum(mask * ce) / max(sum(mask), 1)):
  CE_main  over `loss_mask`;
  CE_mtp   position t predicts targets[t + 1] (token t + 2), valid where loss_mask[t + 1] is set,
           t + 1 lies in the same (non-padding) document as t, and t is not the row's last
           position, so nothing leaks across documents or rows;
  z        per router, the mean over non-padding tokens of logsumexp(router logits)^2, summed
           over the MoE layers and the MTP layer's router.

The loss is assembled from sums (`loss_sums`) and token counts (`token_counts`) so that a
micro-batch can be normalised by the counts of the whole global batch: the gradients of the
micro-batch losses then add up to the full-batch gradient exactly.

A batch is a dict of [batch, seq] arrays: input_ids, targets, segment_ids, positions, loss_mask.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from ling_jax.model.transformer import LingOutput

Batch = Mapping[str, jax.Array]


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits: [batch, seq, vocab]; targets: [batch, seq] int.

    Returns the fp32 cross-entropy [batch, seq] (logsumexp - target logit) and whether the
    argmax equals the target [batch, seq] bool.
    """
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    ce = jax.nn.logsumexp(logits, axis=-1) - target_logit[..., 0]
    correct = jnp.argmax(logits, axis=-1) == targets
    return ce, correct


def mtp_targets(
    targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Targets and mask of the MTP head, whose position t predicts targets[t + 1].

    targets, loss_mask, segment_ids: [batch, seq]. Returns ([batch, seq] int targets (0 at the
    last position), [batch, seq] fp32 mask). The shift stays inside each row.
    """
    shifted_targets = jnp.concatenate([targets[:, 1:], jnp.zeros_like(targets[:, :1])], axis=1)
    next_mask = jnp.concatenate(
        [loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1
    ).astype(bool)
    next_segment = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    same_document = (next_segment == segment_ids) & (segment_ids != 0)
    return shifted_targets, (next_mask & same_document).astype(jnp.float32)


def token_counts(batch: Batch) -> dict[str, jax.Array]:
    """The loss denominators, known from the batch alone (fp32 scalars).

    tokens: main-CE targets; mtp_tokens: MTP targets; router_tokens: non-padding tokens (the
    tokens the routers' z-loss and expert counts see).
    """
    _, mtp_mask = mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"])
    return {
        "tokens": batch["loss_mask"].astype(jnp.float32).sum(),
        "mtp_tokens": mtp_mask.sum(),
        "router_tokens": (batch["segment_ids"] != 0).astype(jnp.float32).sum(),
    }


def loss_sums(output: LingOutput, batch: Batch) -> dict[str, jax.Array]:
    """Un-normalised loss terms of one (micro-)batch (fp32 scalars).

    ce_sum = sum(mask * ce); mtp_ce_sum likewise for MTP; z_sum = router_tokens * (sum of every
    router's token-mean z-loss), i.e. the z-loss summed over tokens; correct = correct targets.
    """
    mask = batch["loss_mask"].astype(jnp.float32)
    ce, correct = token_cross_entropy(output.logits, batch["targets"])
    sums = {"ce_sum": (mask * ce).sum(), "correct": (mask * correct).sum()}

    mtp_ce_sum = jnp.zeros((), jnp.float32)
    if output.mtp_logits is not None:
        targets, mtp_mask = mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"])
        mtp_ce, _ = token_cross_entropy(output.mtp_logits, targets)
        mtp_ce_sum = (mtp_mask * mtp_ce).sum()
    sums["mtp_ce_sum"] = mtp_ce_sum

    z = jnp.zeros((), jnp.float32)
    for stats in (output.moe_stats, output.mtp_stats):
        if stats is not None:
            z = z + stats.z_loss.astype(jnp.float32).sum()
    router_tokens = (batch["segment_ids"] != 0).astype(jnp.float32).sum()
    sums["z_sum"] = z * router_tokens
    return sums


def _mean(total: jax.Array, count: jax.Array) -> jax.Array:
    return total / jnp.maximum(count, 1.0)


def combine_loss(
    sums: Mapping[str, jax.Array],
    counts: Mapping[str, jax.Array],
    *,
    mtp_weight: float,
    z_loss_weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The scalar loss and its metrics from `loss_sums` and the denominators `token_counts`.

    Returns (loss, {loss, ce, mtp_loss, z_loss, tokens, accuracy}).
    """
    ce = _mean(sums["ce_sum"], counts["tokens"])
    mtp_loss = _mean(sums["mtp_ce_sum"], counts["mtp_tokens"])
    z_loss = _mean(sums["z_sum"], counts["router_tokens"])
    loss = ce + mtp_weight * mtp_loss + z_loss_weight * z_loss
    metrics = {
        "loss": loss,
        "ce": ce,
        "mtp_loss": mtp_loss,
        "z_loss": z_loss,
        "tokens": counts["tokens"],
        "accuracy": _mean(sums["correct"], counts["tokens"]),
    }
    return loss, metrics


def compute_loss(
    output: LingOutput, batch: Batch, *, mtp_weight: float, z_loss_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of one whole batch and its scalar metrics."""
    return combine_loss(
        loss_sums(output, batch),
        token_counts(batch),
        mtp_weight=mtp_weight,
        z_loss_weight=z_loss_weight,
    )
