"""Tests for the fitted Ling scaling laws against the figures of SPEC sections 2 and 7.2."""

from __future__ import annotations

import numpy as np
import pytest

from ling_jax.configs import get_preset
from ling_jax.model.counting import non_embedding_flops_per_token
from ling_jax.scaling import laws

TOKENS = 20e12  # Every Ling 2.0 size was pretrained on 20T tokens.
# SPEC section 2: back-solved C, Table 1 peak LR, B_opt in 4096-token sequences, Table 1 batch.
TABLE_1 = {
    "ling_mini_2": dict(compute=1.36e23, lr=3.36e-4, b_opt=4_560, batch=4_400),
    "ling_flash_2": dict(compute=7.1e23, lr=2.61e-4, b_opt=8_330, batch=8_352),
    "ling_1t": dict(compute=6.5e24, lr=1.86e-4, b_opt=18_670, batch=18_144),
}
LING_A, LING_G = 9 / 257, 8.0


def _compute(name: str) -> float:
    return non_embedding_flops_per_token(get_preset(name), 4096) * TOKENS


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_table_1_learning_rate(name):
    # C = M D matches the back-solved C to 0.8% (1.350e23 / 7.126e23 / 6.462e24), so the LR
    # (C^-0.153) lands within 0.15% of Table 1 and prints to the same three digits.
    row = TABLE_1[name]
    compute = _compute(name)
    assert compute == pytest.approx(row["compute"], rel=0.01)
    lr = laws.optimal_lr(compute)
    assert f"{lr:.2e}" == f"{row['lr']:.2e}"
    assert lr == pytest.approx(row["lr"], rel=0.01)


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_table_1_batch_size(name):
    # 4,546 / 8,336 / 18,616 sequences: within 0.3% of SPEC's 4,560 / 8,330 / 18,670 and within
    # 3.5% of the batch sizes Table 1 actually used.
    row = TABLE_1[name]
    sequences = laws.optimal_batch_tokens(_compute(name)) / 4096
    assert sequences == pytest.approx(row["b_opt"], rel=0.02)
    assert sequences == pytest.approx(row["batch"], rel=0.035)


def test_allocation_multiplies_to_compute():
    compute = np.geomspace(1e15, 1e25, 11)
    for arch in laws.ARCHS:
        product = laws.optimal_model_flops_per_token(compute, arch) * laws.optimal_tokens(
            compute, arch
        )
        np.testing.assert_allclose(product / compute, 1.0, atol=1e-3)
    # MoE puts a larger share of compute into tokens than dense (exponent 0.4905 > 0.4578).
    assert laws.optimal_tokens(1e22, "moe") > laws.optimal_tokens(1e22, "dense")
    assert laws.optimal_model_flops_per_token(1e20) == pytest.approx(0.1915 * 1e20**0.5095)


def test_efficiency_leverage_paper_figures():
    # SPEC 7.2, with log2 G and log10 C: 7.24 ("over 7x"), Ling-mini-beta 6.98, Ling 2.0 6.79.
    assert round(laws.efficiency_leverage(0.031, 12, 1e22), 2) == 7.24
    mini_beta = laws.efficiency_leverage(13 / 385, 2 * 2048 / 384, 1e22)
    assert round(mini_beta, 2) == 6.98
    assert round(laws.efficiency_leverage(LING_A, LING_G, 1e22), 1) == 6.8
    assert round(laws.efficiency_leverage(0.035, 8, 1e22), 2) == 6.79


@pytest.mark.parametrize(
    ("name", "expected"), [("ling_mini_2", 8.8), ("ling_flash_2", 10.3), ("ling_1t", 12.8)]
)
def test_efficiency_leverage_at_training_compute(name, expected):
    compute = TABLE_1[name]["compute"]
    assert round(laws.efficiency_leverage(LING_A, LING_G, compute), 1) == expected


def test_optimal_granularity():
    g_star = laws.optimal_granularity()
    assert round(g_star, 1) == 11.3
    grid = np.geomspace(2, 64, 401)
    el = laws.efficiency_leverage(LING_A, grid, 1e21)
    assert grid[np.argmax(el)] == pytest.approx(g_star, rel=0.01)


def test_efficiency_leverage_trends():
    # Grows as A falls and as C grows (SPEC 7.2 qualitative findings).
    a = np.array([0.2, 0.1, 0.05, 0.02, 0.008])
    assert np.all(np.diff(laws.efficiency_leverage(a, 8, 1e21)) > 0)
    c = np.geomspace(1e18, 1e25, 8)
    assert np.all(np.diff(laws.efficiency_leverage(LING_A, 8, c)) > 0)


def test_saturating_activation():
    # A_hat ~ A + A_start for ordinary A, tends to A_start as A -> 0, increases with A.
    assert laws.saturating_activation(0.031) == pytest.approx(0.031 + 1.63e-2, rel=1e-9)
    assert laws.saturating_activation(1e-12) == pytest.approx(1.63e-2, rel=1e-6)
    a = np.geomspace(1e-4, 1, 20)
    assert np.all(np.diff(laws.saturating_activation(a)) > 0)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="compute"):
        laws.optimal_lr(0.0)
    with pytest.raises(ValueError, match="compute"):
        laws.optimal_tokens([1e20, -1.0])
    with pytest.raises(ValueError, match="arch"):
        laws.optimal_tokens(1e20, arch="mixture")
    with pytest.raises(ValueError, match="granularity"):
        laws.efficiency_leverage(0.03, 0, 1e20)


def test_compute_for_flops_per_token_inverts_the_allocation():
    for arch in ("moe", "dense"):
        compute = np.array([1e13, 3e18, 1e22])
        m = laws.optimal_model_flops_per_token(compute, arch)
        np.testing.assert_allclose(laws.compute_for_flops_per_token(m, arch), compute, rtol=1e-12)
    with pytest.raises(ValueError, match="flops_per_token"):
        laws.compute_for_flops_per_token(-1.0)
