"""Loss-versus-compute power-law fits and the efficiency leverage they imply (SPEC 7.1, 7.3).

`fit_power_law` fits L(C) = a C^-b, or a C^-b + c with an irreducible loss c, by least squares
on log L: residuals are relative errors, which suits losses measured to a fixed relative noise.
Internally the law is written around the geometric-mean compute C0 of the data,
L = A0 (C / C0)^-b (+ c), so that the parameters are nearly uncorrelated; `a = A0 C0^b`.

Uncertainty is the usual least-squares covariance s^2 (J^T J)^-1 of the parameters (exact for
the pure power law, the linearised one with the irreducible term), and bands come from the
delta method with a Student-t quantile on n - p degrees of freedom, so that a 5-point
wind-tunnel fit gets honestly wide bands. Only numpy and the standard library are used.

With the irreducible term the fit is a profile search over a grid of c in [0, min L)
(linear least squares of log(L - c) on log C at each c), refined by Levenberg-Marquardt on
the full log-space objective with c >= 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike


class Prediction(NamedTuple):
    """A prediction and its band (arrays shaped like the query)."""

    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student-t quantile: P(|T| <= t) = confidence with `dof` degrees of freedom.

    Exact closed forms of the t distribution for integer dof (Abramowitz & Stegun 26.7.3-4),
    inverted by bisection.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence = {confidence!r} is invalid: expected (0, 1)")
    if not (isinstance(dof, int) and dof >= 1):
        raise ValueError(f"dof = {dof!r} is invalid: expected an integer >= 1")

    def prob_within(t: float) -> float:
        theta = math.atan(t / math.sqrt(dof))
        s, c2 = math.sin(theta), math.cos(theta) ** 2
        if dof % 2 == 0:
            term, total = 1.0, 1.0
            for j in range(1, dof // 2):
                term *= c2 * (2 * j - 1) / (2 * j)
                total += term
            return s * total
        if dof == 1:
            return 2 * theta / math.pi
        term, total = 1.0, 1.0
        for j in range(1, (dof - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)

    lo, hi = 0.0, 1.0
    while prob_within(hi) < confidence:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if prob_within(mid) < confidence else (lo, mid)
    return 0.5 * (lo + hi)


def _log_loss(u: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """log L at dx = log(C / C0) for the centred parameters u = (log A0, b[, c])."""
    power = u[0] - u[1] * dx
    if u.shape[0] == 2:
        return power
    return np.log(np.exp(power) + u[2])


def _jacobian(u: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """d log L / d u: [n, p]."""
    if u.shape[0] == 2:
        return np.stack([np.ones_like(dx), -dx], axis=-1)
    power = np.exp(u[0] - u[1] * dx)
    total = power + u[2]
    share = power / total
    return np.stack([share, -dx * share, 1.0 / total], axis=-1)


def _linear_fit(dx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of y = u0 - u1 dx."""
    slope, intercept = np.polyfit(dx, y, 1)
    return np.array([intercept, -slope])


def _levenberg_marquardt(u: np.ndarray, dx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Minimises |y - log L(u)|^2 from `u`, keeping c >= 0."""
    r = y - _log_loss(u, dx)
    cost, damping = float(r @ r), 1e-3
    for _ in range(500):
        jac = _jacobian(u, dx)
        normal = jac.T @ jac
        step = np.linalg.solve(normal + damping * np.diag(np.diag(normal) + 1e-12), jac.T @ r)
        trial = u + step
        trial[2] = max(trial[2], 0.0)
        r_trial = y - _log_loss(trial, dx)
        cost_trial = float(r_trial @ r_trial)
        if cost_trial < cost:
            converged = cost - cost_trial <= 1e-15 * max(cost, 1e-300)
            u, r, cost, damping = trial, r_trial, cost_trial, max(damping / 10, 1e-12)
            if converged:
                break
        else:
            damping *= 10
            if damping > 1e12:
                break
    return u


@dataclasses.dataclass(frozen=True, eq=False)
class PowerLawFit:
    """A fitted L(C) = a C^-b (+ c).

    Attributes:
      a, b, c: the law (c = 0 without the irreducible term).
      irreducible: whether c was fitted.
      log_center: log C0, the mean log compute of the data.
      params: (log A0, b[, c]) with L = A0 (C / C0)^-b (+ c).
      covariance: covariance of `params`, [p, p].
      residual_std: s, the standard deviation of the log-loss residuals (n - p dof).
      num_points: n.
    """

    a: float
    b: float
    c: float
    irreducible: bool
    log_center: float
    params: np.ndarray
    covariance: np.ndarray
    residual_std: float
    num_points: int

    @property
    def dof(self) -> int:
        return self.num_points - self.params.shape[0]

    @property
    def stderr(self) -> dict[str, float]:
        """Standard errors of a, b and c (a by the delta method)."""
        var = np.diag(self.covariance)
        # log a = log A0 + b log C0.
        var_log_a = (
            var[0] + self.log_center**2 * var[1] + 2 * self.log_center * self.covariance[0, 1]
        )
        out = {"a": self.a * math.sqrt(max(var_log_a, 0.0)), "b": math.sqrt(var[1])}
        out["c"] = math.sqrt(var[2]) if self.irreducible else 0.0
        return out

    def __call__(self, compute: ArrayLike) -> np.ndarray:
        """The fitted loss at `compute`."""
        return np.exp(
            _log_loss(self.params, np.log(_positive("compute", compute)) - self.log_center)
        )

    def predict(
        self,
        compute: ArrayLike,
        confidence: float = 0.95,
        observation_noise: bool = False,
        num_observations: int = 1,
    ) -> Prediction:
        """The fitted loss with a delta-method band at `confidence`.

        The band covers the fitted law (parameter uncertainty); `observation_noise=True` widens
        it to a prediction interval for the mean of `num_observations` new measurements (adds
        s^2 / num_observations in log space).
        """
        if not (isinstance(num_observations, int) and num_observations >= 1):
            raise ValueError(f"num_observations = {num_observations!r}: expected an int >= 1")
        dx = np.log(_positive("compute", compute)) - self.log_center
        log_mean = _log_loss(self.params, np.atleast_1d(dx))
        jac = _jacobian(self.params, np.atleast_1d(dx))
        var = np.einsum("np,pq,nq->n", jac, self.covariance, jac)
        if observation_noise:
            var = var + self.residual_std**2 / num_observations
        half = t_quantile(confidence, self.dof) * np.sqrt(np.maximum(var, 0.0))
        shape = np.shape(dx)
        return Prediction(
            mean=np.exp(log_mean).reshape(shape),
            lower=np.exp(log_mean - half).reshape(shape),
            upper=np.exp(log_mean + half).reshape(shape),
        )

    def compute_for_loss(self, loss: ArrayLike) -> np.ndarray:
        """The compute at which the fitted law reaches `loss` (inf at or below c)."""
        return np.exp(_log_compute(self.params, self.log_center, np.log(_positive("loss", loss))))


def _log_compute(u: np.ndarray, log_center: float, log_loss: np.ndarray) -> np.ndarray:
    """Inverse of the law: log C at which log L = log_loss."""
    c = u[2] if u.shape[0] == 3 else 0.0
    excess = np.exp(log_loss) - c
    with np.errstate(divide="ignore", invalid="ignore"):
        log_excess = np.where(excess > 0, np.log(np.where(excess > 0, excess, 1.0)), -np.inf)
        return log_center + (u[0] - log_excess) / u[1]


def _positive(name: str, value: ArrayLike) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(f"{name} = {value!r} is invalid: expected positive finite values")
    return arr


def fit_power_law(compute: ArrayLike, loss: ArrayLike, irreducible: bool = False) -> PowerLawFit:
    """Fits L = a C^-b (irreducible=False) or L = a C^-b + c (True) in log space.

    Args:
      compute: [n] training FLOPs of each run.
      loss: [n] final (or compute-optimal) losses.
      irreducible: fit the irreducible loss c >= 0 as well.

    Returns:
      A `PowerLawFit`; needs n > p points (p = 2 or 3) for the uncertainty.
    """
    x = np.log(_positive("compute", compute))
    y = np.log(_positive("loss", loss))
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"compute {x.shape} and loss {y.shape} must be 1-D of equal length")
    p = 3 if irreducible else 2
    if x.shape[0] <= p:
        raise ValueError(f"{x.shape[0]} points cannot fit {p} parameters with uncertainty")
    if np.ptp(x) == 0:
        raise ValueError("all compute values are equal: the exponent is not identifiable")
    log_center = float(x.mean())
    dx = x - log_center

    if irreducible:
        floor = float(np.exp(y.min()))
        grid = floor * (1.0 - np.geomspace(1e-4, 1.0, 96))  # Dense near min L; ends at c = 0.
        best, best_cost = None, np.inf
        for c in grid:
            u = np.append(_linear_fit(dx, np.log(np.exp(y) - c)), c)
            r = y - _log_loss(u, dx)
            if r @ r < best_cost:
                best, best_cost = u, float(r @ r)
        u = _levenberg_marquardt(best, dx, y)
    else:
        u = _linear_fit(dx, y)

    r = y - _log_loss(u, dx)
    dof = x.shape[0] - p
    s2 = float(r @ r) / dof
    jac = _jacobian(u, dx)
    covariance = s2 * np.linalg.pinv(jac.T @ jac)
    c = float(u[2]) if irreducible else 0.0
    return PowerLawFit(
        a=float(np.exp(u[0] + u[1] * log_center)),
        b=float(u[1]),
        c=c,
        irreducible=irreducible,
        log_center=log_center,
        params=u,
        covariance=covariance,
        residual_std=math.sqrt(s2),
        num_points=int(x.shape[0]),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class EfficiencyLeverage:
    """EL = C_dense / C_moe at equal loss, at each MoE compute in `compute`.

    Attributes:
      compute: the MoE compute budgets C.
      value: EL at each C (inf where the MoE loss is at or below the dense irreducible loss).
      lower, upper: the delta-method band at the requested confidence.
      moe, dense: the two loss fits.
    """

    compute: np.ndarray
    value: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    moe: PowerLawFit
    dense: PowerLawFit


def _as_fit(points: PowerLawFit | tuple[ArrayLike, ArrayLike], irreducible: bool) -> PowerLawFit:
    if isinstance(points, PowerLawFit):
        return points
    compute, loss = points
    return fit_power_law(compute, loss, irreducible=irreducible)


def _numerical_gradient(f: Callable[[np.ndarray], np.ndarray], u: np.ndarray) -> np.ndarray:
    """Central differences of a vector function: [n, p]."""
    cols = []
    for i in range(u.shape[0]):
        h = 1e-6 * max(1.0, abs(u[i]))
        e = np.zeros_like(u)
        e[i] = h
        cols.append((f(u + e) - f(u - e)) / (2 * h))
    return np.stack(cols, axis=-1)


def fit_efficiency_leverage(
    moe_points: PowerLawFit | tuple[ArrayLike, ArrayLike],
    dense_points: PowerLawFit | tuple[ArrayLike, ArrayLike],
    compute: ArrayLike,
    *,
    irreducible: bool = False,
    confidence: float = 0.95,
) -> EfficiencyLeverage:
    """The efficiency leverage of a MoE family over a dense one (SPEC 7.1).

    Fits L(C) to each family (or takes given fits), then at each MoE compute C finds the dense
    compute C_dense with L_dense(C_dense) = L_moe(C): EL = C_dense / C. For two pure power laws
    EL = (a_d / (a_m C^-b_m))^(1 / b_d) / C. The band propagates both fits' covariances
    (independent runs) by the delta method, with the t quantile of the smaller dof.

    Args:
      moe_points, dense_points: (compute, loss) arrays of each family, or a `PowerLawFit`.
      compute: MoE compute budgets at which to evaluate EL.
      irreducible: fit an irreducible term when points are given.
      confidence: level of the band.
    """
    moe, dense = _as_fit(moe_points, irreducible), _as_fit(dense_points, irreducible)
    log_c = np.log(_positive("compute", compute))
    log_c1 = np.atleast_1d(log_c)
    p_moe = moe.params.shape[0]

    def log_el(u: np.ndarray) -> np.ndarray:
        log_loss = _log_loss(u[:p_moe], log_c1 - moe.log_center)
        return _log_compute(u[p_moe:], dense.log_center, log_loss) - log_c1

    u = np.concatenate([moe.params, dense.params])
    cov = np.zeros((u.shape[0], u.shape[0]))
    cov[:p_moe, :p_moe], cov[p_moe:, p_moe:] = moe.covariance, dense.covariance
    center = log_el(u)
    with np.errstate(invalid="ignore"):
        grad = _numerical_gradient(log_el, u)
        var = np.einsum("np,pq,nq->n", grad, cov, grad)
    # Where the MoE loss reaches the dense floor, EL is infinite and so is its band.
    var = np.where(np.isfinite(center), np.maximum(var, 0.0), 0.0)
    half = t_quantile(confidence, min(moe.dof, dense.dof)) * np.sqrt(var)
    shape = np.shape(log_c)
    return EfficiencyLeverage(
        compute=np.exp(log_c),
        value=np.exp(center).reshape(shape),
        lower=np.exp(center - half).reshape(shape),
        upper=np.exp(center + half).reshape(shape),
        moe=moe,
        dense=dense,
    )
