"""Next-token selection: greedy, temperature, top-k and top-p (nucleus), per row.

The settings are arrays, not Python constants, so changing them never recompiles, and every
row of a batch may use its own. Order as in Hugging Face: temperature, then top-k, then top-p
on what top-k kept. Tokens tied with the k-th (or the nucleus' last) logit are kept too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature}: expected >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}: expected >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}: expected in (0, 1] (1 disables it)")


@struct.dataclass
class SamplingParams:
    """Per-row sampling settings as arrays: temperature, top_p [batch] fp32; top_k [batch] int32."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def broadcast(cls, config: SamplingConfig, batch: int) -> SamplingParams:
        return cls(
            temperature=np.full((batch,), config.temperature, np.float32),
            top_k=np.full((batch,), config.top_k, np.int32),
            top_p=np.full((batch,), config.top_p, np.float32),
        )


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets every logit outside the top-k / top-p set of its row to -inf.

    logits: [batch, vocab] fp32; top_k: [batch] int (0: all); top_p: [batch] float (1: all)
    """
    vocab = logits.shape[-1]
    ranked = -jnp.sort(-logits, axis=-1)  # [batch, vocab], descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab).astype(jnp.int32)
    kth = jnp.take_along_axis(ranked, k[:, None] - 1, axis=-1)  # [batch, 1]
    # Nucleus over the top-k survivors: the fewest leading tokens whose mass reaches top_p.
    ranked = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p[:, None]  # The first token always stays.
    num_keep = jnp.maximum(keep.sum(-1), 1)
    last = jnp.take_along_axis(ranked, num_keep[:, None] - 1, axis=-1)  # [batch, 1]
    threshold = jnp.maximum(kth, last)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits: jax.Array, params: SamplingParams, key: jax.Array) -> jax.Array:
    """Picks one token per row: [batch, vocab] fp32 -> [batch] int32.

    Rows with temperature 0 take the argmax; the others sample from the filtered softmax of
    logits / temperature. The sort behind the filters runs only if some row samples.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
        scaled = logits / temperature[:, None]
        filtered = filter_logits(scaled, params.top_k, params.top_p)
        drawn = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda _: greedy, None)
