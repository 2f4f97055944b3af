"""Tests for power-law fits, their bands, and the efficiency leverage between two fits."""

from __future__ import annotations

import numpy as np
import pytest

from ling_jax.scaling import fitting

COMPUTE = np.geomspace(1e16, 1e22, 30)


def pure(compute):
    return 50.0 * np.asarray(compute) ** -0.07


def saturating(compute):
    return 400.0 * np.asarray(compute) ** -0.15 + 1.7


def noisy(law, compute, sigma, seed):
    rng = np.random.default_rng(seed)
    return law(compute) * np.exp(rng.normal(0.0, sigma, np.shape(compute)))


def test_t_quantile():
    for dof, expected in ((1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (1000, 1.9623)):
        assert fitting.t_quantile(0.95, dof) == pytest.approx(expected, abs=1e-4)
    assert fitting.t_quantile(0.99, 5) == pytest.approx(4.0321, abs=1e-4)


def test_exact_data_is_recovered_exactly():
    fit = fitting.fit_power_law(COMPUTE, pure(COMPUTE))
    assert (fit.a, fit.b, fit.c) == (pytest.approx(50.0, rel=1e-9), pytest.approx(0.07), 0.0)
    fit = fitting.fit_power_law(COMPUTE, saturating(COMPUTE), irreducible=True)
    assert fit.a == pytest.approx(400.0, rel=1e-5)
    assert fit.b == pytest.approx(0.15, rel=1e-6)
    assert fit.c == pytest.approx(1.7, rel=1e-6)


def test_recovers_pure_power_law_from_noise():
    fit = fitting.fit_power_law(COMPUTE, noisy(pure, COMPUTE, 0.005, seed=0))
    err = fit.stderr
    assert abs(fit.b - 0.07) < 3 * err["b"] and err["b"] < 0.002
    assert abs(fit.a - 50.0) < 3 * err["a"] and err["a"] < 5.0
    assert fit.residual_std == pytest.approx(0.005, rel=0.35)


def test_recovers_irreducible_loss_from_noise():
    fit = fitting.fit_power_law(
        COMPUTE, noisy(saturating, COMPUTE, 0.002, seed=1), irreducible=True
    )
    err = fit.stderr
    assert fit.b == pytest.approx(0.15, abs=max(3 * err["b"], 1e-3))
    assert fit.c == pytest.approx(1.7, abs=max(3 * err["c"], 0.01))
    assert fit.a == pytest.approx(400.0, rel=0.15)


@pytest.mark.parametrize(
    ("law", "irreducible", "trials"), [(pure, False, 200), (saturating, True, 60)]
)
def test_band_covers_the_truth(law, irreducible, trials):
    # Coverage of the 95% band at an interior point and at 100x extrapolation.
    query = np.array([1e19, 1e24])
    hits = np.zeros(2)
    for seed in range(trials):
        fit = fitting.fit_power_law(COMPUTE, noisy(law, COMPUTE, 0.003, seed), irreducible)
        band = fit.predict(query)
        hits += (band.lower <= law(query)) & (law(query) <= band.upper)
        assert np.all(band.lower < band.mean) and np.all(band.mean < band.upper)
    assert np.all(hits / trials >= 0.85), hits / trials


def test_small_wind_tunnel_fit_has_wide_band():
    # Five points and three parameters: two dof, t = 4.30, so the band is honest but wide.
    compute = np.geomspace(1e18, 1e20, 5)
    fit = fitting.fit_power_law(compute, noisy(saturating, compute, 0.002, 3), irreducible=True)
    assert fit.dof == 2
    band = fit.predict(1e22)
    assert band.lower <= saturating(1e22) <= band.upper
    interval = fit.predict(1e19, observation_noise=True)
    assert interval.upper - interval.lower > fit.predict(1e19).upper - fit.predict(1e19).lower


def test_compute_for_loss_inverts_the_law():
    fit = fitting.fit_power_law(COMPUTE, saturating(COMPUTE), irreducible=True)
    np.testing.assert_allclose(fit.compute_for_loss(fit(COMPUTE)), COMPUTE, rtol=1e-9)
    assert np.isinf(fit.compute_for_loss(1.6))


def test_efficiency_leverage_of_two_power_laws_is_analytic():
    a_m, b_m, a_d, b_d = 2.0, 0.05, 3.0, 0.06
    query = np.array([1e19, 1e22])
    moe = (COMPUTE, a_m * COMPUTE**-b_m)
    dense = (COMPUTE, a_d * COMPUTE**-b_d)
    el = fitting.fit_efficiency_leverage(moe, dense, query)
    analytic = (a_d / (a_m * query**-b_m)) ** (1 / b_d) / query
    np.testing.assert_allclose(el.value, analytic, rtol=1e-8)
    # Equal exponents give a constant leverage (a_d / a_m)^(1 / b).
    el = fitting.fit_efficiency_leverage((COMPUTE, 2.0 * COMPUTE**-0.06), dense, query)
    np.testing.assert_allclose(el.value, (a_d / 2.0) ** (1 / 0.06), rtol=1e-8)


def test_efficiency_leverage_of_shifted_law_with_noise():
    # A MoE family that reaches any loss with 3x less compute than dense: EL = 3 at every C.
    moe_loss = noisy(lambda c: saturating(3.0 * c), COMPUTE, 0.002, seed=4)
    dense_loss = noisy(saturating, COMPUTE, 0.002, seed=5)
    el = fitting.fit_efficiency_leverage(
        (COMPUTE, moe_loss), (COMPUTE, dense_loss), [1e18, 1e20], irreducible=True
    )
    assert np.all(el.lower <= 3.0) and np.all(el.upper >= 3.0)
    np.testing.assert_allclose(el.value, 3.0, rtol=0.25)
    assert el.moe.irreducible and el.dense.irreducible


def test_efficiency_leverage_below_the_dense_floor_is_infinite():
    moe = fitting.fit_power_law(COMPUTE, 400.0 * COMPUTE**-0.15 + 1.5, irreducible=True)
    dense = fitting.fit_power_law(COMPUTE, saturating(COMPUTE), irreducible=True)
    el = fitting.fit_efficiency_leverage(moe, dense, [1e18, 1e30])
    assert np.isfinite(el.value[0]) and np.isinf(el.value[1])


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="loss"):
        fitting.fit_power_law([1e18, 1e19, 1e20], [3.0, -1.0, 2.0])
    with pytest.raises(ValueError, match="points"):
        fitting.fit_power_law([1e18, 1e19, 1e20], [3.0, 2.5, 2.2], irreducible=True)
    with pytest.raises(ValueError, match="equal"):
        fitting.fit_power_law([1e18, 1e19], [3.0, 2.5, 2.2])
