"""Meshes, logical-axis sharding rules and the active sharding context."""

from ling_jax.parallel.mesh import BATCH_AXES, MESH_AXES, default_mesh_config, make_mesh
from ling_jax.parallel.rules import DEFAULT_RULES, logical_to_spec
from ling_jax.parallel.sharding import (
    active,
    constrain,
    replicated,
    use_sharding,
    variable_shardings,
)

__all__ = [
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "active",
    "constrain",
    "default_mesh_config",
    "logical_to_spec",
    "make_mesh",
    "replicated",
    "use_sharding",
    "variable_shardings",
]
