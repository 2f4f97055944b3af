"""The KV cache: keys and values of every layer, per kv head, after QK-norm and RoPE.

Rows of a batch are left-padded to one prompt length, so every row writes the same cache slot
at every step and one `dynamic_update_slice` serves the whole batch. Row b's prompt occupies
slots [start[b], prompt_len); slot s of row b holds the token at position s - start[b], and
slots before start[b] are never attended to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

# The model's attribute names of its scanned block stacks, in execution order.
STACKS = ("dense_layers", "moe_layers")


@struct.dataclass
class KVCache:
    """k, v: {stack name: [layers, batch, max_len, kv_heads, head_dim]} in the compute dtype.

    start:  [batch] int32, the first slot of each row (the number of left-padding slots).
    length: [] int32, slots written so far (the next token goes to slot `length`).
    """

    k: dict[str, jax.Array]
    v: dict[str, jax.Array]
    start: jax.Array
    length: jax.Array

    @property
    def max_len(self) -> int:
        return next(iter(self.k.values())).shape[2]

    def positions(self, num_tokens: int) -> jax.Array:
        """Positions of the next `num_tokens` slots: [batch, num_tokens] int32 (>= 0)."""
        slots = self.length + jnp.arange(num_tokens, dtype=jnp.int32)
        return jnp.maximum(slots[None, :] - self.start[:, None], 0)

    def key_mask(self, num_tokens: int) -> jax.Array:
        """Which cached slots the next `num_tokens` queries see: [batch, 1, 1, num_tokens,
        max_len] bool (the row's own slots, causally), broadcastable like `attention_mask`."""
        slots = jnp.arange(self.max_len, dtype=jnp.int32)
        query_slots = self.length + jnp.arange(num_tokens, dtype=jnp.int32)
        causal = slots[None, :] <= query_slots[:, None]  # [num_tokens, max_len]
        own = slots[None, :] >= self.start[:, None]  # [batch, max_len]
        return (causal[None] & own[:, None, :])[:, None, None]


def stack_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Layers per scanned stack, for the stacks the model has."""
    dense = config.first_k_dense_replace
    sizes = {"dense_layers": dense, "moe_layers": config.num_layers - dense}
    return {name: n for name, n in sizes.items() if n}


def init_cache(
    config: ml_collections.ConfigDict, start: jax.Array, max_len: int, dtype=None
) -> KVCache:
    """An empty cache for `len(start)` rows of `max_len` slots; `start` [batch] as in KVCache."""
    batch = start.shape[0]
    dtype = jnp.dtype(dtype or config.dtype)
    k, v = {}, {}
    for name, layers in stack_sizes(config).items():
        shape = (layers, batch, max_len, config.num_kv_heads, config.head_dim)
        k[name] = jnp.zeros(shape, dtype)
        v[name] = jnp.zeros(shape, dtype)
    return KVCache(k=k, v=v, start=jnp.asarray(start, jnp.int32), length=jnp.zeros((), jnp.int32))
