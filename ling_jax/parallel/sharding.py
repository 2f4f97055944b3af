"""The active mesh and rules, activation constraints, and shardings of whole states.

The trainer enters `use_sharding(mesh, rules)` around tracing its steps; model code calls
`constrain(x, logical_axes)` on activations and asks `active_mesh()` whether to run its
shard_map paths. Outside the context everything is a no-op, so the model runs unchanged on
one device, in tests and in notebooks.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ling_jax.parallel.rules import DEFAULT_RULES, LogicalRules, logical_to_spec


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: LogicalRules


_ACTIVE: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar(
    "ling_jax_sharding", default=None
)


@contextlib.contextmanager
def use_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[ShardingContext]:
    token = _ACTIVE.set(ShardingContext(mesh, rules))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def active() -> ShardingContext | None:
    """The sharding context, or None when the model runs without a mesh (or on one device)."""
    context = _ACTIVE.get()
    if context is None or context.mesh.size == 1:
        return None
    return context


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op without an active mesh."""
    context = active()
    if context is None:
        return x
    spec = logical_to_spec(logical_axes, context.rules, x.shape, context.mesh, "activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(context.mesh, spec))


def variable_shardings(state: nnx.State, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """NamedShardings for a state of `nnx.Variable`s (abstract or concrete), by their metadata.

    Returns a tree shaped like `nnx.as_pure(state)`. Variables without `out_sharding` metadata
    are replicated.
    """

    def sharding(path, variable: nnx.Variable) -> NamedSharding:
        axes = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
        name = "/".join(str(p) for p in path)
        spec = logical_to_spec(axes, rules, variable.shape, mesh, name)
        return NamedSharding(mesh, spec)

    return nnx.map_state(sharding, state)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
