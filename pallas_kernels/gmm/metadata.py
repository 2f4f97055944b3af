"""The scalar-prefetched schedule of the grouped matmul kernels, computed in jnp.

Rows are cut into row tiles of `tm` rows. A "visit" is one pass of the kernel's middle grid
dimension: one (row tile, group) pair whose product the kernel computes. The arrays live in
SMEM (scalar prefetch) and drive both the BlockSpec index maps and the in-kernel masking.

gmm (`gmm_schedule`), tile-major: every row tile is visited once per *local* non-empty group
that has rows in it, in row order, so a tile that straddles a group boundary is visited
consecutively once per group and its output block stays resident in VMEM between the visits.
A tile with no local rows (padding rows, rows routed to other shards' experts) gets one "zero
visit" that only writes zeros, so the output never holds uninitialised memory. Bound:
num_visits <= tiles + num_local - 1, since each extra visit is an internal boundary between two
consecutive non-empty local groups.

tgmm (`tgmm_schedule`), group-major: every local group is visited once per row tile it spans
(an empty group once, to write its zero gradient), so each output block [g, k, n] is finished
before the next group starts. Same bound.

Zero visits (and empty-group visits) name, as the blocks to fetch, the blocks the previous real
visit already holds, so they cost a grid step but no DMA.

The Triton (GPU) gmm reads the same visits (group_offsets, visit_tile, visit_group, num_visits)
from global memory, one program per visit; the fetch_* fields only serve the TPU index maps.
The GPU tgmm needs no visit list, only `group_offsets`: it reads each group's rows from the
group's first row, unaligned.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Schedule(NamedTuple):
    """Per-visit arrays (length `max_visits`, entries past `num_visits` unused) + group bounds.

    group_offsets: [num_groups + 1] int32, first row of each group; the last entry is
      sum(group_sizes) (rows beyond it are padding).
    visit_tile: row tile the visit writes (gmm) / reads (tgmm).
    visit_group: global group id of the visit; gmm: -1 for a zero visit; tgmm: -1 past the end.
    fetch_tile, fetch_group: the blocks the index maps fetch (equal to the above for real visits).
    fetch_k: -1 for real visits (fetch along the reduction grid index); else the fixed reduction
      block the previous real visit ended on, so nothing is re-fetched (gmm only).
    num_visits: [1] int32, the size of the kernel's dynamic grid dimension.
    """

    group_offsets: jax.Array
    visit_tile: jax.Array
    visit_group: jax.Array
    fetch_tile: jax.Array
    fetch_group: jax.Array
    fetch_k: jax.Array
    num_visits: jax.Array


def group_offsets(group_sizes: jax.Array) -> jax.Array:
    """[num_groups + 1] int32: the first row of each group, then sum(group_sizes)."""
    return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(group_sizes.astype(jnp.int32))])


def _group_bounds(group_sizes, tm, group_offset, num_local):
    sizes = group_sizes.astype(jnp.int32)
    offsets = group_offsets(sizes)
    ends = offsets[1:]
    starts = ends - sizes
    gid = jnp.arange(sizes.shape[0], dtype=jnp.int32)
    offset = jnp.asarray(group_offset, jnp.int32)
    local = (gid >= offset) & (gid < offset + num_local)
    first_tile = starts // tm
    last_tile = jnp.maximum(ends - 1, 0) // tm
    return sizes, offsets, starts, local, first_tile, last_tile


def max_visits(m: int, tm: int, num_local: int) -> int:
    return -(-m // tm) + max(num_local - 1, 0)


def gmm_schedule(
    group_sizes: jax.Array,
    *,
    m: int,
    tm: int,
    num_reduction_blocks: int,
    group_offset: jax.Array | int,
    num_local: int,
) -> Schedule:
    """Tile-major visits for gmm (see the module docstring)."""
    tiles = -(-m // tm)
    sizes, offsets, _, local, first_tile, last_tile = _group_bounds(
        group_sizes, tm, group_offset, num_local
    )
    active = local & (sizes > 0)
    ones = active.astype(jnp.int32)
    # Per tile: active groups that start at or before it, and that end strictly before it.
    opened = jnp.zeros(tiles + 1, jnp.int32).at[jnp.where(active, first_tile, tiles)].add(ones)
    closed = jnp.zeros(tiles + 1, jnp.int32).at[jnp.where(active, last_tile, tiles)].add(ones)
    closed_before = jnp.cumsum(closed)[:tiles] - closed[:tiles]  # [tiles]
    overlap = jnp.cumsum(opened)[:tiles] - closed_before  # [tiles], active groups in the tile
    per_tile = jnp.maximum(overlap, 1)
    tile_end = jnp.cumsum(per_tile)  # [tiles]
    num_visits = tile_end[-1]

    v = jnp.arange(max_visits(m, tm, num_local), dtype=jnp.int32)
    tile = jnp.minimum(jnp.searchsorted(tile_end, v, side="right"), tiles - 1).astype(jnp.int32)
    rank = closed_before[tile] + v - (tile_end[tile] - per_tile[tile])  # Among active groups.
    group = jnp.searchsorted(jnp.cumsum(ones), rank + 1, side="left").astype(jnp.int32)
    real = (overlap[tile] > 0) & (v < num_visits)
    group = jnp.where(real, jnp.minimum(group, group_sizes.shape[0] - 1), -1)

    # Zero visits fetch what the last real visit before them holds (its last reduction block),
    # or, before any real visit, what the first real visit needs first (reduction block 0).
    last_real = jax.lax.cummax(jnp.where(real, v, -1))
    first_real = jnp.argmax(real).astype(jnp.int32)
    source = jnp.where(last_real >= 0, last_real, first_real)
    fallback_group = jnp.asarray(group_offset, jnp.int32)  # No real visit at all.
    fetch_group = jnp.where(group[source] >= 0, group[source], fallback_group)
    fetch_k = jnp.where(last_real >= 0, num_reduction_blocks - 1, 0)
    return Schedule(
        group_offsets=offsets,
        visit_tile=tile,
        visit_group=group,
        fetch_tile=jnp.where(real, tile, tile[source]),
        fetch_group=jnp.where(real, group, fetch_group),
        fetch_k=jnp.where(real, -1, fetch_k).astype(jnp.int32),
        num_visits=num_visits.reshape(1),
    )


def tgmm_schedule(
    group_sizes: jax.Array,
    *,
    m: int,
    tm: int,
    group_offset: jax.Array | int,
    num_local: int,
) -> Schedule:
    """Group-major visits for tgmm (see the module docstring)."""
    tiles = -(-m // tm)
    sizes, offsets, starts, local, first_tile, last_tile = _group_bounds(
        group_sizes, tm, group_offset, num_local
    )
    per_group = jnp.where(local, jnp.where(sizes > 0, last_tile - first_tile + 1, 1), 0)
    group_end = jnp.cumsum(per_group)  # [num_groups]
    num_visits = group_end[-1]

    v = jnp.arange(max_visits(m, tm, num_local), dtype=jnp.int32)
    group = jnp.searchsorted(group_end, v, side="right").astype(jnp.int32)
    group = jnp.minimum(group, group_sizes.shape[0] - 1)
    within = v - (group_end[group] - per_group[group])
    # An empty group reads the tile holding the row just before it: the previous visit's tile.
    empty_tile = jnp.maximum(starts[group] - 1, 0) // tm
    tile = jnp.where(sizes[group] > 0, first_tile[group] + within, empty_tile)
    tile = jnp.clip(tile, 0, tiles - 1).astype(jnp.int32)
    group = jnp.where(v < num_visits, group, -1)
    return Schedule(
        group_offsets=offsets,
        visit_tile=tile,
        visit_group=group,
        fetch_tile=tile,
        fetch_group=group,
        fetch_k=jnp.full_like(v, -1),
        num_visits=num_visits.reshape(1),
    )
