"""The dense SwiGLU feed-forward block: (silu(x W_g) * (x W_u)) W_d."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ling_jax.model import fp8
from ling_jax.model.params import cast, normal_param


class SwiGLU(nnx.Module):
    """Used for the first-k dense layers and for the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, config, *, rngs: nnx.Rngs):
        self.config: ml_collections.ConfigDict = config
        self.gate = normal_param(rngs, (hidden_size, intermediate_size), ("embed", "mlp"), config)
        self.up = normal_param(rngs, (hidden_size, intermediate_size), ("embed", "mlp"), config)
        self.down = normal_param(rngs, (intermediate_size, hidden_size), ("mlp", "embed"), config)

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [..., embed] -> [..., embed]
        if fp8.enabled(self.config):
            gate = fp8.linear(self, "gate", x, self.gate[...])
            up = fp8.linear(self, "up", x, self.up[...])
            return fp8.linear(self, "down", jax.nn.silu(gate) * up, self.down[...])
        gate = jnp.einsum("...d,df->...f", x, cast(self.gate[...], self.config))
        up = jnp.einsum("...d,df->...f", x, cast(self.up[...], self.config))
        return jnp.einsum(
            "...f,fd->...d", jax.nn.silu(gate) * up, cast(self.down[...], self.config)
        )
