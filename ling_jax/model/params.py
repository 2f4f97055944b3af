"""Parameter creation with logical axis names, and dtype helpers shared by every module.

Every trained tensor is an `nnx.Param` carrying `out_sharding` = its logical axis names (for
example `("embed", "mlp")`). `ling_jax.parallel` maps those names to mesh axes with one rule table;
stacking layers for `nnx.scan` prepends the `"layers"` axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

LAYERS_AXIS = "layers"


class ExpertBias(nnx.Variable):
    """The aux-loss-free load-balancing bias: fp32, used only for expert selection.

    Not an `nnx.Param`, so it gets no gradient and no optimizer state; the trainer updates it
    from the routed-token counts (SPEC section 5.1).
    """


def to_dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def normal_param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Sequence[str | None],
    config: ml_collections.ConfigDict,
) -> nnx.Param:
    """A matrix drawn from N(0, init_std^2), stored in `config.param_dtype`."""
    value = config.init_std * jax.random.normal(
        rngs.params(), tuple(shape), to_dtype(config.param_dtype)
    )
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def ones_param(
    shape: Sequence[int], axes: Sequence[str | None], config: ml_collections.ConfigDict
) -> nnx.Param:
    """A norm scale initialised to one."""
    value = jnp.ones(tuple(shape), to_dtype(config.param_dtype))
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def cast(x: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """Casts a parameter or activation to the compute dtype."""
    return x.astype(to_dtype(config.dtype))
