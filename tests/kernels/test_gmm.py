"""Pallas gmm/tgmm in interpret mode against the jnp references: values and gradients.

Shapes are fixed (group sizes are traced), so each (dtype, tiling) compiles once. M, K, N are
deliberately not multiples of the blocks: the last row tile, reduction block and column block
overhang their arrays, and the interpreter fills overhangs and uninitialised outputs with NaN,
so any unmasked read or unwritten output row shows up.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.gmm import Tiling, gmm, tuning
from tests.kernels import gmm_checks

M, K, N, G = 200, 192, 160, 6
TILING = Tiling(32, 128, 128)  # Row tiles of 32: many tiles straddle groups.
SUB_TILING = Tiling(64, 128, 128, sub_m=32)  # Two row sub-tiles per tile, skipped when missed.
KERNEL = dict(interpret=True)  # How the shared checks call the kernels here.

GROUP_SIZES = {
    "uneven": [30, 5, 45, 7, 60, 53],
    "first_and_last_empty": [0, 70, 33, 0, 97, 0],
    "all_in_one_group": [0, 0, 200, 0, 0, 0],
    "tile_multiples": [32, 64, 0, 32, 32, 40],
    "padding_rows": [17, 0, 40, 3, 0, 31],  # 91 of 200 rows used.
    "all_padding": [0, 0, 0, 0, 0, 0],
}


def make_inputs(seed: int, dtype, num_local: int = G, transpose_rhs: bool = False):
    return gmm_checks.make_inputs(seed, dtype, (M, K, N), num_local, transpose_rhs)


def check_against_reference(sizes, dtype, *, tiling=TILING, num_local=G, **kwargs):
    return gmm_checks.check_against_reference(
        sizes, dtype, dims=(M, K, N), tiling=tiling, num_local=num_local, **kwargs
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", GROUP_SIZES)
def test_gmm_values_and_grads(case, dtype):
    check_against_reference(GROUP_SIZES[case], dtype)


@pytest.mark.parametrize("case", ["uneven", "first_and_last_empty", "padding_rows"])
def test_gmm_row_sub_tiles(case):
    check_against_reference(GROUP_SIZES[case], jnp.float32, tiling=SUB_TILING)


@pytest.mark.parametrize("offset", [0, 2, 3])
def test_gmm_group_offset(offset):
    """rhs holds 3 of the 6 groups (expert sharding); other groups' rows give zeros."""
    check_against_reference(GROUP_SIZES["uneven"], jnp.float32, num_local=3, offset=offset)
    check_against_reference(
        GROUP_SIZES["first_and_last_empty"], jnp.float32, num_local=3, offset=offset
    )


@pytest.mark.parametrize("case", ["uneven", "padding_rows"])
def test_gmm_transpose_rhs(case):
    check_against_reference(GROUP_SIZES[case], jnp.float32, transpose_rhs=True)


@settings(max_examples=6, deadline=None)
@given(
    st.lists(st.integers(0, 80), min_size=G, max_size=G).filter(lambda s: sum(s) <= M),
    st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_gmm_random_group_sizes(sizes, dtype):
    check_against_reference(sizes, dtype, seed=sum(sizes))


@pytest.mark.parametrize("offset,num_local", [(0, G), (1, 4)])
def test_tgmm(offset, num_local):
    gmm_checks.check_tgmm(
        GROUP_SIZES["first_and_last_empty"],
        dims=(M, K, N),
        tiling=TILING,
        offset=offset,
        num_local=num_local,
        **KERNEL,
    )


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_fp8_operands(transpose_rhs):
    gmm_checks.check_fp8_operands(
        GROUP_SIZES["uneven"],
        dims=(M, K, N),
        num_local=G,
        transpose_rhs=transpose_rhs,
        tiling=TILING,
        **KERNEL,
    )


def test_gmm_rejects_bad_inputs():
    lhs, rhs, _ = make_inputs(0, jnp.float32)
    sizes = jnp.asarray(GROUP_SIZES["uneven"], jnp.int32)
    with pytest.raises(ValueError, match="contraction dims"):
        gmm(lhs[:, :100], rhs, sizes, interpret=True)
    with pytest.raises(ValueError, match="int32"):
        gmm(lhs, rhs, sizes.astype(jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="tiling.tm"):
        gmm(lhs, rhs, sizes, tiling=(20, 128, 128), interpret=True)
    with pytest.raises(ValueError, match="tiling.tk"):
        gmm(lhs, rhs, sizes, tiling=(32, 100, 128), interpret=True)
    with pytest.raises(ValueError, match="lhs_scale"):
        gmm(lhs.astype(jnp.float8_e4m3fn), rhs, sizes, interpret=True)


def test_tiling_table_fits_vmem():
    for (k, n), (tm, tk, tn) in tuning.TABLE.items():
        t = tuning.default_tiling(65536, k, n)
        assert (t.tm, t.tk, t.tn) == (tm, tk, tn)
        assert tuning.gmm_vmem_bytes(t, 2, 2) <= tuning.VMEM_BUDGET, (k, n)
        tg = tuning.fit_tgmm(t, k, n, 2, 2)
        assert tuning.tgmm_vmem_bytes(tg, 2, 2) <= tuning.VMEM_BUDGET, (k, n)


def test_tiling_rule_reproduces_table(monkeypatch):
    """The table pins the rule's choices; they must stay what the rule would pick."""
    table = dict(tuning.TABLE)
    monkeypatch.setattr(tuning, "TABLE", {})
    for (k, n), (tm, tk, tn) in table.items():
        t = tuning.default_tiling(65536, k, n)
        assert (t.tm, t.tk, t.tn) == (tm, tk, tn), (k, n)


def test_megacore_gets_two_parallel_blocks():
    t = tuning.default_tiling(65536, 2048, 512, device_kind="TPU v5")
    assert -(-512 // t.tn) >= 2
    tg = tuning.fit_tgmm(tuning.Tiling(512, 2048, 512), 2048, 512, 2, 2, "TPU v5")
    assert -(-2048 // tg.tk) * -(-512 // tg.tn) >= 2


def test_default_tiling_small_and_odd_shapes():
    t = tuning.default_tiling(100, 96, 200)
    assert t == Tiling(100, 96, 200, 0)  # Whole dims: always legal blocks.
    t = tuning.default_tiling(4096, 6000, 2500, dtype=jnp.float32)
    assert t.tk % 128 == 0 and t.tn % 128 == 0 and t.tm in (256, 512)
    assert tuning.gmm_vmem_bytes(t, 4, 4) <= tuning.VMEM_BUDGET
