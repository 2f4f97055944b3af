"""The routed experts: E SwiGLU FFNs run as grouped matmuls over expert-sorted rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ling_jax.model import fp8
from ling_jax.model.moe.grouped_matmul import grouped_matmul
from ling_jax.model.params import cast, normal_param


class RoutedExperts(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        self.config = config
        moe = config.moe
        shape_in = (moe.num_experts, config.hidden_size, moe.expert_intermediate_size)
        shape_out = (moe.num_experts, moe.expert_intermediate_size, config.hidden_size)
        self.gate = normal_param(rngs, shape_in, ("exp", "embed", "expert_mlp"), config)
        self.up = normal_param(rngs, shape_in, ("exp", "embed", "expert_mlp"), config)
        self.down = normal_param(rngs, shape_out, ("exp", "expert_mlp", "embed"), config)

    def __call__(
        self, rows: jax.Array, group_sizes: jax.Array, expected_rows: int = 0
    ) -> jax.Array:
        # rows: [assignments, embed] sorted by expert; group_sizes: [E]. expected_rows: the
        # real rows expected when `rows` is a worst-case buffer (expert parallelism), 0 = all.
        def gmm(lhs, weight, op):
            if fp8.enabled(self.config):
                return fp8.grouped(self, op, lhs, weight, group_sizes)
            return grouped_matmul(
                lhs,
                cast(weight, self.config),
                group_sizes,
                backend=self.config.moe.backend,
                tile_rows=self.config.moe.xla_tile_rows,
                expected_rows=expected_rows,
            )

        # Gate and up share one grouped matmul (one dispatch layout, one pass over the rows).
        gate_up = jnp.concatenate([self.gate[...], self.up[...]], axis=-1)  # [E, embed, 2 mlp]
        gate, up = jnp.split(gmm(rows, gate_up, "gate_up"), 2, axis=-1)  # [assignments, mlp] each
        return gmm(jax.nn.silu(gate) * up, self.down[...], "down")  # [assignments, embed]
