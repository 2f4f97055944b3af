"""One table maps every logical axis name to mesh axes; everything else derives from it.

Parameters carry logical names in their `out_sharding` metadata (`ling_jax.model.params`), and
activations are constrained with `ling_jax.parallel.sharding.constrain`. A logical axis maps to
a mesh axis, a tuple of mesh axes, or None (replicated). A mesh axis of size 1 shards nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jax.sharding import Mesh, PartitionSpec

from ling_jax.parallel.mesh import BATCH_AXES

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    # Parameters.
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("qkv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("expert_mlp", "tensor"),
    ("norm", None),
    ("mtp_concat", None),
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: LogicalRules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    name: str = "tensor",
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    A mesh axis is used at most once per spec (the first logical axis to claim it wins). Given
    `shape` and `mesh`, each sharded dimension must be divisible by its mesh axes' size, else a
    ValueError names `name`, the dimension and the mesh axes.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, logical in enumerate(logical_axes):
        if logical is None:
            spec.append(None)
            continue
        if logical not in table:
            raise ValueError(f"{name}: logical axis {logical!r} has no sharding rule")
        target = table[logical]
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        if shape is not None and mesh is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[dim] % size:
                raise ValueError(
                    f"{name}: dimension {dim} ({logical}) of size {shape[dim]} is not divisible "
                    f"by mesh axes {axes} of total size {size}"
                )
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)
