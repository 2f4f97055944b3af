"""Grouped (ragged) matmul for the routed experts, with pluggable backends.

`grouped_matmul(lhs, rhs, group_sizes)` multiplies each group of consecutive rows of `lhs`
(the tokens routed to one expert, sorted by expert) by that group's weight matrix in `rhs`.

Backends:
  "pallas"      `pallas_kernels.gmm`: Mosaic kernels on TPU (interpreted elsewhere, for tests).
  "ragged_dot"  `jax.lax.ragged_dot`, the reference. XLA:CPU lowers it to one masked dense matmul
                per group, i.e. num_groups times the useful FLOPs, so it is never the CPU default.
  "xla"         Tiled batched matmul, described below. Dropless, static shapes, fully jit-able,
                and within a small constant of a dense matmul of the same FLOPs on CPU.

Why the "xla" path exists, and how it works: every group is re-laid into whole tiles of
`tile_rows` rows (a group's last tile is zero-padded), so that each tile belongs to exactly one
group. The static buffer holds the worst case, ceil(m / t) + num_groups tiles. Each tile gathers
its rows and its group's weight matrix, and batched matmuls [c, t, k] x [c, k, n] do the work;
the rows are then gathered back to their sorted positions. Unused tiles and padding rows read
zeros. The wasted work is at most num_groups * t rows, which the default tile keeps near m / 4.
The tiles are processed in chunks of c tiles by a loop, so that the gathered weights
([c, k, n] per step) and rows stay a bounded working set: on CPU, materialising all tiles'
weights at once made fwd + bwd about 2x slower. Memory is O(m * (k + n) + num_groups * k * n),
never O(m * num_groups).

Cost scales with the real rows, not with m: the loop runs only over the chunks that hold
used tiles (a data-dependent trip count, `_TileLayout.used_chunks`), so rows past
sum(group_sizes) cost no FLOPs. This matters under expert parallelism, where the receive
buffer is sized for the dropless worst case (every device sends everything to one device,
m = EP x the rows actually received on average). There, `expected_rows` (the rows the caller
expects to be real) sizes the tile and the chunk instead of m: a chunk holds at most a quarter
of the expected load's tiles, so rounding the trip count up to whole chunks wastes at most
25% of the expected work, on top of the tile padding (at most num_groups * t rows, <= 25% of
the expected rows with the default tile). Nothing is dropped whatever the routing: a skewed
load just runs more chunks, up to all of them.

The backward pass is a `jax.custom_vjp` over the same layout (autodiff of a scan would stack
every step's gathered weights as residuals, and a loop with a data-dependent trip count cannot
be reverse-differentiated at all): d lhs is the same tiled matmul against the
transposed weights, and d rhs accumulates each tile's lhs^T @ d out into its group.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from pallas_kernels.gmm import gmm

GROUPED_MATMUL_BACKENDS = ("xla", "ragged_dot", "pallas")

_MIN_TILE_ROWS = 8
_MAX_TILE_ROWS = 512
_CPU_CHUNK_BYTES = 4 << 20
_ACCEL_CHUNK_BYTES = 1 << 30
# A chunk holds at most 1 / _CHUNKS_PER_LOAD of the expected load's tiles (see the docstring).
_CHUNKS_PER_LOAD = 4


def default_tile_rows(m: int, num_groups: int) -> int:
    """Rows per tile of the "xla" backend, from the static shapes.

    The largest power of two <= m / (4 * num_groups), i.e. about a quarter of the mean group
    size, clamped to [8, 512]. Padding each group to whole tiles then costs at most
    num_groups * t <= m / 4 extra rows (25% more FLOPs in the worst case), while tiles stay
    large enough for an efficient batched matmul and few enough (<= 5 * num_groups) that the
    per-tile weight gather stays cheap.
    """
    target = max(1, m // (4 * num_groups))
    tile = 1 << (target.bit_length() - 1)
    return min(max(tile, _MIN_TILE_ROWS), _MAX_TILE_ROWS)


def _chunk_tiles(tile_rows: int, k: int, n: int) -> int:
    """Tiles per loop step: one step's fp32 working set (rows, weights, grads) within a target.

    Cache-sized on CPU, where streaming all tiles' gathered weights and rows through memory at
    once costs more than the matmuls; on accelerators the target only bounds memory.
    """
    target = _CPU_CHUNK_BYTES if jax.default_backend() == "cpu" else _ACCEL_CHUNK_BYTES
    tile_bytes = 4 * 2 * (tile_rows * (k + n) + k * n)
    return max(1, target // tile_bytes)


class _TileLayout(NamedTuple):
    """Index maps between the sorted rows and the tile-aligned buffer, split into loop chunks.

    Buffer row p lies in tile p // t; chunk c holds tiles [c * tiles_per_chunk, ...).
    """

    tile_group: jax.Array  # [chunks, tiles_per_chunk] int32; unused tiles: the last group
    src: jax.Array  # [chunks, tiles_per_chunk * t] int32, sorted row of each buffer row, else m
    dest: jax.Array  # [m] int32, buffer row of each sorted row; out of range for padding rows
    used_chunks: jax.Array  # [] int32, chunks holding a used tile: the loops' trip count


def chunk_tiles_for(m: int, num_groups: int, k: int, n: int, tile_rows: int, expected_rows: int):
    """(tiles per chunk, number of chunks) of the "xla" layout; static.

    The chunk is the smaller of the working-set bound (`_chunk_tiles`) and a quarter of the
    tiles the expected load needs, so the data-dependent trip count tracks the real rows.
    """
    min_tiles = -(-m // tile_rows) + num_groups  # Static worst case: every group ends mid-tile.
    expected_tiles = -(-expected_rows // tile_rows) + num_groups
    per_chunk = min(_chunk_tiles(tile_rows, k, n), max(1, expected_tiles // _CHUNKS_PER_LOAD))
    num_chunks = -(-min_tiles // per_chunk)
    return -(-min_tiles // num_chunks), num_chunks


def _tile_layout(
    group_sizes: jax.Array, m: int, k: int, n: int, tile_rows: int, expected_rows: int
) -> _TileLayout:
    num_groups = group_sizes.shape[0]
    chunk_tiles, num_chunks = chunk_tiles_for(m, num_groups, k, n, tile_rows, expected_rows)
    num_tiles = num_chunks * chunk_tiles
    sizes = group_sizes.astype(jnp.int32)  # [g]
    row_ends = jnp.cumsum(sizes)  # [g]
    row_starts = row_ends - sizes  # [g]
    group_tiles = (sizes + tile_rows - 1) // tile_rows  # [g]
    tile_ends = jnp.cumsum(group_tiles)  # [g]
    buf_starts = (tile_ends - group_tiles) * tile_rows  # [g], first buffer row of each group

    # Group of a tile / row: the first group whose end lies beyond it (skips empty groups).
    tile_group = jnp.searchsorted(tile_ends, jnp.arange(num_tiles, dtype=jnp.int32), side="right")
    tile_group = jnp.minimum(tile_group, num_groups - 1).astype(jnp.int32)  # [num_tiles]

    buf_row = jnp.arange(num_tiles * tile_rows, dtype=jnp.int32)  # [num_tiles * t]
    buf_group = tile_group[buf_row // tile_rows]
    offset = buf_row - buf_starts[buf_group]
    src = jnp.where(offset < sizes[buf_group], row_starts[buf_group] + offset, m)

    row = jnp.arange(m, dtype=jnp.int32)  # [m]
    row_group = jnp.minimum(jnp.searchsorted(row_ends, row, side="right"), num_groups - 1)
    dest = buf_starts[row_group] + row - row_starts[row_group]
    dest = jnp.where(row < row_ends[-1], dest, num_tiles * tile_rows)
    used_chunks = (tile_ends[-1] + chunk_tiles - 1) // chunk_tiles
    return _TileLayout(
        tile_group.reshape(num_chunks, chunk_tiles),
        src.astype(jnp.int32).reshape(num_chunks, chunk_tiles * tile_rows),
        dest.astype(jnp.int32),
        used_chunks.astype(jnp.int32),
    )


def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x[idx] along axis 0, with zeros for out-of-range indices."""
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _forward(lhs, rhs, layout, out_dtype):
    k, n = lhs.shape[1], rhs.shape[2]
    num_chunks, chunk_tiles = layout.tile_group.shape

    def chunk(c, y):  # y: [chunks, c * t, n]; chunks past `used_chunks` stay zero.
        tile_group, src = layout.tile_group[c], layout.src[c]  # [c], [c * t]
        x = _take_rows(lhs, src).reshape(chunk_tiles, -1, k)  # [c, t, k]
        w = jnp.take(rhs, tile_group, axis=0, mode="clip")  # [c, k, n]
        out = jnp.einsum("ctk,ckn->ctn", x, w, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(y, out.reshape(-1, n).astype(out_dtype), c, 0)

    y = jnp.zeros((num_chunks, layout.src.shape[1], n), out_dtype)
    y = jax.lax.fori_loop(0, layout.used_chunks, chunk, varying_like(y, lhs, rhs, layout.src))
    return _take_rows(y.reshape(-1, n), layout.dest)  # [m, n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _xla_grouped_matmul(lhs, rhs, group_sizes, tile_rows, expected_rows, out_dtype):
    layout = _tile_layout(group_sizes, *lhs.shape, rhs.shape[2], tile_rows, expected_rows)
    return _forward(lhs, rhs, layout, out_dtype)


def _xla_fwd(lhs, rhs, group_sizes, tile_rows, expected_rows, out_dtype):
    layout = _tile_layout(group_sizes, *lhs.shape, rhs.shape[2], tile_rows, expected_rows)
    return _forward(lhs, rhs, layout, out_dtype), (lhs, rhs, layout)


def _varying_axes(x: jax.Array) -> set[str]:
    return set(jax.typeof(x).manual_axis_type.varying)


def varying_like(x: jax.Array, *others: jax.Array) -> jax.Array:
    """Marks a fresh array (zeros) as varying over the manual mesh axes `others` vary over.

    Inside `shard_map`, a loop carry must keep one type across iterations, and a buffer that
    a collective fills must not claim to be replicated: autodiff would then sum its
    cotangents over those axes (an all-reduce of the whole buffer, and wrong gradients)."""
    axes = set().union(*(_varying_axes(o) for o in others)) - _varying_axes(x)
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def _match_manual_type(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """Inside `shard_map`: a weight replicated over a mesh axis gets the sum of the gradients
    of all its users on that axis (what autodiff does for ordinary ops)."""
    extra = _varying_axes(cotangent) - _varying_axes(primal)
    return jax.lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _xla_bwd(tile_rows, expected_rows, out_dtype, res, dout):
    del tile_rows, expected_rows, out_dtype  # Baked into the layout / dout.
    lhs, rhs, layout = res
    k, n = rhs.shape[1:]
    num_chunks, chunk_tiles = layout.tile_group.shape

    def chunk(c, carry):  # Only the used chunks, like the forward pass.
        drhs, dx_all = carry
        tile_group, src = layout.tile_group[c], layout.src[c]  # [c], [c * t]
        x = _take_rows(lhs, src).reshape(chunk_tiles, -1, k)  # [c, t, k]
        dy = _take_rows(dout, src).reshape(chunk_tiles, -1, n)  # [c, t, n]
        w = jnp.take(rhs, tile_group, axis=0, mode="clip")  # [c, k, n]
        dx = jnp.einsum("ctn,ckn->ctk", dy, w, preferred_element_type=jnp.float32)
        dw = jnp.einsum("ctk,ctn->ckn", x, dy, preferred_element_type=jnp.float32)
        drhs = drhs.at[tile_group].add(dw, indices_are_sorted=True)  # Each tile into its group.
        dx = dx.reshape(-1, k).astype(lhs.dtype)  # [c * t, k]
        return drhs, jax.lax.dynamic_update_index_in_dim(dx_all, dx, c, 0)

    varying = (lhs, rhs, dout, layout.src)
    drhs = varying_like(jnp.zeros(rhs.shape, jnp.float32), *varying)
    dx = varying_like(jnp.zeros((num_chunks, layout.src.shape[1], k), lhs.dtype), *varying)
    drhs, dx = jax.lax.fori_loop(0, layout.used_chunks, chunk, (drhs, dx))
    dlhs = _take_rows(dx.reshape(-1, k), layout.dest)  # [m, k]
    return _match_manual_type(dlhs, lhs), _match_manual_type(drhs.astype(rhs.dtype), rhs), None


_xla_grouped_matmul.defvjp(_xla_fwd, _xla_bwd)
_xla_grouped_matmul = jax.jit(_xla_grouped_matmul, static_argnums=(3, 4, 5))


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    backend: str,
    tile_rows: int = 0,
    expected_rows: int = 0,
    preferred_element_type: DTypeLike | None = None,
) -> jax.Array:
    """Per-group matmul of sorted rows: out[rows of group g] = lhs[rows of group g] @ rhs[g].

    Args:
      lhs: [m, k], rows sorted by group (group 0's rows first, then group 1's, ...).
      rhs: [num_groups, k, n], one weight matrix per group.
      group_sizes: [num_groups] int, rows per group; sum(group_sizes) <= m.
      backend: one of `GROUPED_MATMUL_BACKENDS`.
      tile_rows: rows per tile of the "xla" backend; 0 picks
        `default_tile_rows(expected_rows, num_groups)`.
      expected_rows: "xla" backend: the real rows (sum(group_sizes)) the caller expects, when
        lhs is a worst-case buffer (expert parallelism); sizes the tile and the chunk of the
        data-dependent loop. Any group sizes stay correct; only the cost depends on it. 0 = m.
        The "pallas" kernels' grid already follows the group sizes, so they ignore it.
      preferred_element_type: output dtype, default `lhs.dtype`. Accumulation is always fp32.

    Returns:
      [m, n]; rows beyond sum(group_sizes) are zero (and get a zero gradient).
    """
    if backend not in GROUPED_MATMUL_BACKENDS:
        raise ValueError(
            f"Unknown grouped_matmul backend {backend!r}; "
            f"expected one of {GROUPED_MATMUL_BACKENDS}."
        )
    m, k = lhs.shape
    num_groups, rhs_k, _ = rhs.shape
    if rhs_k != k or group_sizes.shape != (num_groups,):
        raise ValueError(
            f"grouped_matmul shapes disagree: lhs {lhs.shape}, rhs {rhs.shape}, "
            f"group_sizes {group_sizes.shape}; expected [m, k], [g, k, n], [g]."
        )
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if backend == "ragged_dot":
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
        return out.astype(out_dtype)
    if backend == "pallas":
        # Mosaic kernels on TPU, Triton kernels on GPU (`gmm`'s target follows the backend);
        # the Pallas interpreter elsewhere (slow: for tests only).
        interpret = jax.default_backend() not in ("tpu", "gpu")
        return gmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype, interpret=interpret)
    if tile_rows < 0:
        raise ValueError(f"tile_rows must be >= 0 (0 = automatic), got {tile_rows}.")
    if not 0 <= expected_rows <= m:
        raise ValueError(f"expected_rows must be in [0, m={m}] (0 = m), got {expected_rows}.")
    expected_rows = expected_rows or m
    tile_rows = tile_rows or default_tile_rows(expected_rows, num_groups)
    return _xla_grouped_matmul(lhs, rhs, group_sizes, tile_rows, expected_rows, out_dtype)
