"""Policy-gradient losses for RL post-training: GRPO, GSPO and LPO (SPEC section 11).

All three are one clipped surrogate over *units* of a completion. A unit's importance ratio is
the geometric mean of its tokens' ratios,

    r_u = exp( mean_{t in u} (log pi_theta(y_t) - log pi_old(y_t)) ),

and every token carries its unit's clipped term min(r_u A, clip(r_u, 1 - eps_low, 1 + eps_high) A)
with its completion's advantage A. Only the choice of unit differs:

    GRPO  every token is its own unit (the token-level ratio);
    GSPO  the whole completion is one unit (the sequence-level geometric mean);
    LPO   sentences, split after pause punctuation (eps = 0.03 in the Ling 2.0 report).

Aggregation "token_mean" divides the sum over tokens by the batch's completion tokens, which is
LPO's (1 / sum_i |y_i|) sum_i sum_k |s_ik| min(...): a unit of |s| tokens weighs |s|.
"sequence_mean" averages each completion's token mean over completions (GRPO's and GSPO's
papers). The loss is minus the objective, so minimising it ascends the objective.

Shapes: [batch, seq] per completion token, with `mask` 1 on completion tokens (never the prompt
or padding), and [batch] advantages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean", "sequence_mean")
LPO_EPSILON = 0.03  # SPEC section 11.
LossAndMetrics = tuple[jax.Array, dict[str, jax.Array]]


def group_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Â = (R - mean_G R) / (std_G R + eps) within each prompt's group.

    rewards: [prompts, G] -> [prompts, G]. A group whose rewards are all equal gets zeros.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    mean = rewards.mean(axis=-1, keepdims=True)
    std = rewards.std(axis=-1, keepdims=True)
    return (rewards - mean) / (std + eps)


def sentence_ids(tokens: jax.Array, pause_ids: jax.Array) -> jax.Array:
    """Index of the sentence each token belongs to: [batch, seq] int32, from 0 in every row.

    A sentence ends with (includes) a token in `pause_ids` ([num_pause] int); the next token
    starts a new sentence.
    """
    is_pause = jnp.isin(tokens, jnp.asarray(pause_ids)).astype(jnp.int32)  # [batch, seq]
    return jnp.cumsum(is_pause, axis=-1) - is_pause


def unit_log_ratios(log_ratio: jax.Array, mask: jax.Array, unit_ids: jax.Array) -> jax.Array:
    """Each token's unit mean of `log_ratio` over the unit's masked tokens: [batch, seq].

    log_ratio, mask: [batch, seq]; unit_ids: [batch, seq] int in [0, seq).
    """
    batch, seq = log_ratio.shape
    flat = (jnp.arange(batch)[:, None] * seq + unit_ids).reshape(-1)  # [batch * seq]
    mask = mask.astype(jnp.float32)
    sums = jax.ops.segment_sum((log_ratio * mask).reshape(-1), flat, num_segments=batch * seq)
    counts = jax.ops.segment_sum(mask.reshape(-1), flat, num_segments=batch * seq)
    means = sums / jnp.maximum(counts, 1.0)
    return means[flat].reshape(batch, seq)


def _aggregate(per_token: jax.Array, mask: jax.Array, aggregation: str) -> jax.Array:
    if aggregation == "token_mean":
        return (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    if aggregation == "sequence_mean":
        lengths = mask.sum(axis=-1)  # [batch]
        per_row = (per_token * mask).sum(axis=-1) / jnp.maximum(lengths, 1.0)
        rows = (lengths > 0).astype(jnp.float32)
        return (per_row * rows).sum() / jnp.maximum(rows.sum(), 1.0)
    raise ValueError(f"aggregation = {aggregation!r}: expected one of {AGGREGATIONS}")


def clipped_unit_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    unit_ids: jax.Array,
    *,
    eps_low: float,
    eps_high: float | None = None,
    aggregation: str = "token_mean",
) -> LossAndMetrics:
    """The clipped surrogate over units (module docstring); returns (loss, metrics).

    logp, old_logp: [batch, seq] log-probabilities of the sampled tokens under the policy being
    trained and the one that sampled them; advantages: [batch]; mask: [batch, seq];
    unit_ids: [batch, seq] int. metrics: clip_fraction (tokens whose term is clipped),
    ratio_mean (mean unit ratio over tokens).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation = {aggregation!r}: expected one of {AGGREGATIONS}")
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.astype(jnp.float32)
    log_ratio = logp.astype(jnp.float32) - jax.lax.stop_gradient(old_logp).astype(jnp.float32)
    ratio = jnp.exp(unit_log_ratios(log_ratio, mask, unit_ids))  # [batch, seq]
    adv = jax.lax.stop_gradient(advantages).astype(jnp.float32)[:, None]  # [batch, 1]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    objective = jnp.minimum(unclipped, clipped)
    loss = -_aggregate(objective, mask, aggregation)
    tokens = jnp.maximum(mask.sum(), 1.0)
    metrics = {
        "clip_fraction": ((clipped < unclipped) * mask).sum() / tokens,
        "ratio_mean": (ratio * mask).sum() / tokens,
    }
    return loss, metrics


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps: float = 0.2,
    aggregation: str = "token_mean",
) -> LossAndMetrics:
    """Token-level clipped ratio (GRPO; "token_mean" is DAPO's token-sum normalisation)."""
    unit_ids = jnp.broadcast_to(jnp.arange(mask.shape[-1]), mask.shape)
    return clipped_unit_loss(
        logp, old_logp, advantages, mask, unit_ids, eps_low=eps, aggregation=aggregation
    )


def gspo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    eps: float = 3e-4,
    aggregation: str = "sequence_mean",
) -> LossAndMetrics:
    """Sequence-level geometric-mean ratio (GSPO; its paper clips at about 3e-4..4e-4)."""
    unit_ids = jnp.zeros(mask.shape, jnp.int32)
    return clipped_unit_loss(
        logp, old_logp, advantages, mask, unit_ids, eps_low=eps, aggregation=aggregation
    )


def lpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    tokens: jax.Array,
    pause_ids: jax.Array,
    *,
    eps: float = LPO_EPSILON,
    aggregation: str = "token_mean",
) -> LossAndMetrics:
    """Sentence-level geometric-mean ratios (LPO); sentences end at `pause_ids` tokens.

    tokens: [batch, seq] the sampled completion tokens; pause_ids: [num_pause] int.
    """
    return clipped_unit_loss(
        logp,
        old_logp,
        advantages,
        mask,
        sentence_ids(tokens, pause_ids),
        eps_low=eps,
        aggregation=aggregation,
    )


def reference_kl(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """Token mean of the k3 estimator of KL(pi_theta || pi_ref): exp(d) - d - 1, d = ref - logp.

    Non-negative, zero where the policies agree; logp, ref_logp, mask: [batch, seq].
    """
    mask = mask.astype(jnp.float32)
    d = jax.lax.stop_gradient(ref_logp).astype(jnp.float32) - logp.astype(jnp.float32)
    k3 = jnp.exp(d) - d - 1.0
    return (k3 * mask).sum() / jnp.maximum(mask.sum(), 1.0)
