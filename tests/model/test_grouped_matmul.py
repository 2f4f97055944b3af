"""Grouped matmul backends against a numpy loop over groups: values and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_jax.model.moe import grouped_matmul as gmm_module
from ling_jax.model.moe.grouped_matmul import (
    GROUPED_MATMUL_BACKENDS,
    default_tile_rows,
    grouped_matmul,
)

# Fixed shapes everywhere, so each (backend, tile, dtype) compiles once.
M, K, N, G = 40, 16, 8, 5
TILE = 8

GROUP_SIZES = {
    "uneven": [3, 17, 1, 12, 7],
    "first_and_last_empty": [0, 9, 0, 31, 0],
    "all_in_one_group": [0, 0, 40, 0, 0],
    "tile_multiples": [8, 16, 0, 8, 8],
    "padding_rows": [5, 0, 11, 3, 0],  # 19 of 40 rows used.
    "all_padding": [0, 0, 0, 0, 0],
}


def reference(lhs, rhs, group_sizes, cotangent):
    """fp64 loop over groups: the output and the gradients of sum(out * cotangent)."""
    lhs, rhs, cotangent = (np.asarray(a, np.float64) for a in (lhs, rhs, cotangent))
    out, dlhs, drhs = np.zeros((M, N)), np.zeros((M, K)), np.zeros((G, K, N))
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        rows = slice(start, start + size)
        out[rows] = lhs[rows] @ rhs[g]
        dlhs[rows] = cotangent[rows] @ rhs[g].T
        drhs[g] = lhs[rows].T @ cotangent[rows]
        start += size
    return out, dlhs, drhs


def make_inputs(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(M, K)), dtype)
    rhs = jnp.asarray(rng.normal(size=(G, K, N)), dtype)
    cotangent = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
    return lhs, rhs, cotangent


@functools.cache
def value_and_grads(backend, tile_rows=TILE, out_dtype=None, expected_rows=0):
    """jit(lhs, rhs, group_sizes, cotangent) -> ((loss, out), (d lhs, d rhs))."""

    def loss(lhs, rhs, group_sizes, cotangent):
        out = grouped_matmul(
            lhs,
            rhs,
            group_sizes,
            backend=backend,
            tile_rows=tile_rows,
            expected_rows=expected_rows,
            preferred_element_type=out_dtype,
        )
        return jnp.vdot(out.astype(jnp.float32), cotangent), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def check(backend, group_sizes, seed=0, tile_rows=TILE, tol=1e-4, expected_rows=0):
    lhs, rhs, cotangent = make_inputs(seed)
    sizes = jnp.asarray(group_sizes, jnp.int32)
    fn = value_and_grads(backend, tile_rows, expected_rows=expected_rows)
    (_, out), (dlhs, drhs) = fn(lhs, rhs, sizes, cotangent)
    ref_out, ref_dlhs, ref_drhs = reference(lhs, rhs, group_sizes, cotangent)
    np.testing.assert_allclose(out, ref_out, atol=tol, rtol=tol)
    np.testing.assert_allclose(dlhs, ref_dlhs, atol=tol, rtol=tol)
    np.testing.assert_allclose(drhs, ref_drhs, atol=tol, rtol=tol)
    used = int(np.sum(group_sizes))
    assert not np.any(np.asarray(out)[used:]), "padding rows must be exactly zero"
    assert not np.any(np.asarray(dlhs)[used:]), "padding rows must get a zero gradient"


@pytest.mark.parametrize("case", GROUP_SIZES)
@pytest.mark.parametrize("backend", GROUPED_MATMUL_BACKENDS)
def test_matches_reference(backend, case):
    check(backend, GROUP_SIZES[case])


@pytest.mark.parametrize("tile_rows", [0, 16])
def test_xla_other_tiles(tile_rows):
    check("xla", GROUP_SIZES["uneven"], tile_rows=tile_rows)
    check("xla", GROUP_SIZES["padding_rows"], tile_rows=tile_rows)


def test_xla_many_scan_chunks(monkeypatch):
    """A working-set target of three tiles splits the 10 tiles into 4 scan steps (one unused)."""
    tile_bytes = 4 * 2 * (TILE * (K + N) + K * N)
    monkeypatch.setattr(gmm_module, "_CPU_CHUNK_BYTES", 3 * tile_bytes)
    gmm_module._xla_grouped_matmul.clear_cache()
    try:
        assert gmm_module._chunk_tiles(TILE, K, N) == 3
        lhs, rhs, cotangent = make_inputs(1)
        fn = value_and_grads.__wrapped__("xla")  # A fresh jit, not the cached one-chunk trace.
        for sizes in (GROUP_SIZES["uneven"], GROUP_SIZES["padding_rows"]):
            (_, out), (dlhs, drhs) = fn(lhs, rhs, jnp.asarray(sizes), cotangent)
            ref_out, ref_dlhs, ref_drhs = reference(lhs, rhs, sizes, cotangent)
            np.testing.assert_allclose(out, ref_out, atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(dlhs, ref_dlhs, atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(drhs, ref_drhs, atol=1e-4, rtol=1e-4)
    finally:
        gmm_module._xla_grouped_matmul.clear_cache()


def test_xla_loop_runs_only_over_used_tiles():
    """With a small expected load (as for an expert-parallel receive buffer) the chunks are
    single tiles and the trip count is the tiles the group sizes need; any sizes stay exact."""
    trips = {}
    for case, sizes in GROUP_SIZES.items():
        layout = gmm_module._tile_layout(jnp.asarray(sizes), M, K, N, TILE, expected_rows=8)
        assert layout.tile_group.shape == (10, 1)  # ceil(40 / 8) + 5 tiles, one per chunk.
        trips[case] = int(layout.used_chunks)
        check("xla", sizes, expected_rows=8)
    # Tiles per group: ceil(size / 8), summed.
    assert trips == {
        "uneven": 8,
        "first_and_last_empty": 6,
        "all_in_one_group": 5,
        "tile_multiples": 5,
        "padding_rows": 4,
        "all_padding": 0,
    }
    # Without a hint (expected = M: 10 tiles) a chunk holds a quarter of them, 2 tiles.
    layout = gmm_module._tile_layout(jnp.asarray([5, 0, 11, 3, 0]), M, K, N, TILE, M)
    assert layout.tile_group.shape == (5, 2) and int(layout.used_chunks) == 2


def test_expected_rows_out_of_range_is_rejected():
    lhs, rhs, _ = make_inputs(0)
    with pytest.raises(ValueError, match=r"expected_rows must be in \[0, m=40\]"):
        grouped_matmul(lhs, rhs, jnp.full((G,), 8), backend="xla", expected_rows=41)


@pytest.mark.parametrize("backend", GROUPED_MATMUL_BACKENDS)
def test_bf16_inputs_accumulate_in_fp32(backend):
    lhs, rhs, cotangent = make_inputs(2, jnp.bfloat16)
    sizes = GROUP_SIZES["padding_rows"]
    ref_out, ref_dlhs, ref_drhs = reference(lhs, rhs, sizes, cotangent)
    # fp32 output: bf16 products are exact in fp32, so only fp32 summation error remains.
    (_, out), (dlhs, drhs) = value_and_grads(backend, out_dtype=jnp.float32)(
        lhs, rhs, jnp.asarray(sizes), cotangent
    )
    assert out.dtype == jnp.float32 and dlhs.dtype == drhs.dtype == jnp.bfloat16
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dlhs, np.float32), ref_dlhs, atol=5e-2, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(drhs, np.float32), ref_drhs, atol=5e-2, rtol=1e-2)
    # Default bf16 output: one bf16 rounding of the fp32 sum.
    (_, out), _ = value_and_grads(backend)(lhs, rhs, jnp.asarray(sizes), cotangent)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=1e-2, rtol=8e-3)
    assert not np.any(np.asarray(out, np.float32)[sum(sizes) :])


@st.composite
def group_sizes_strategy(draw):
    """G sizes with sum <= M: cut [0, used) at G - 1 sorted points."""
    used = draw(st.integers(0, M))
    cuts = sorted(draw(st.lists(st.integers(0, used), min_size=G - 1, max_size=G - 1)))
    return np.diff([0, *cuts, used]).tolist()


@pytest.mark.parametrize("backend", GROUPED_MATMUL_BACKENDS)
@settings(max_examples=15, deadline=None)
@given(sizes=group_sizes_strategy(), seed=st.integers(0, 3))
def test_random_group_sizes(backend, sizes, seed):
    check(backend, sizes, seed=seed)


def test_unknown_backend_is_rejected():
    lhs, rhs, _ = make_inputs(0)
    with pytest.raises(ValueError, match=r"'cuda'.*\('xla', 'ragged_dot', 'pallas'\)"):
        grouped_matmul(lhs, rhs, jnp.full((G,), 8), backend="cuda")


def test_default_tile_rows():
    assert default_tile_rows(16384, 64) == 64  # A quarter of the mean group size.
    assert default_tile_rows(16384, 48) == 64  # Rounded down to a power of two.
    assert default_tile_rows(M, G) == 8  # Clamped below...
    assert default_tile_rows(1 << 24, 8) == 512  # ... and above.
