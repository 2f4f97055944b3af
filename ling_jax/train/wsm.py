"""WSM merge weights: emulate a learning-rate decay by averaging constant-LR snapshots (SPEC 8).

Merging k+1 consecutive snapshots θ_n … θ_{n+k} with weights c_0 … c_k (c_j ≥ 0, Σ c_j = 1)

    θ̂ = Σ_j c_j θ_{n+j} = θ_n + Σ_{i=1..k} w_i g_i,    w_i = Σ_{j=i..k} c_j,

applies the update g_i of interval i (taken at the constant peak LR) scaled by w_i: the merge is
the run that would have decayed its learning rate by the factors w_1 ≥ … ≥ w_k. Conversely
(Theorem 3.1) a target non-increasing decay 1 ≥ w_1 ≥ … ≥ w_k ≥ 0 is obtained with

    c_k = w_k,   c_j = w_j − w_{j+1} (1 ≤ j < k),   c_0 = 1 − w_1.

A relative decay curve f: [0, 1] -> [0, 1] (f(0) = 1) is discretised as w_i = f(i / (k + 1)),
which makes the uniform mean exactly a linear decay. For k = 8 (9 snapshots):

    linear  1 − x           c = 0.111 each
    cosine  (1 + cos πx)/2  c = .030 .087 .133 .163 .174 .163 .133 .087 .030
    1-sqrt  1 − √x          c = .333 .138 .106 .089 .079 .071 .065 .061 .057

    merge_weights(9, "cosine")        # -> c_0 … c_8, oldest snapshot first
    emulated_decay(merge_weights(9, "cosine"))   # -> w_1 … w_8 = f(i / 9)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

DecayShape = str | Callable[[float], float]

# Relative decay curves f(x), x in [0, 1] the fraction of the merge window elapsed.
DECAY_CURVES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}
# Tolerance on w being non-increasing and in [0, 1] (float round-off of user curves).
_TOLERANCE = 1e-9


def decay_curve(shape: DecayShape) -> Callable[[float], float]:
    """The curve f of a shape name in `DECAY_CURVES` ("mean"/"uniform" mean "linear"), or
    `shape` itself when it is a callable."""
    if callable(shape):
        return shape
    name = {"mean": "linear", "uniform": "linear"}.get(shape, shape)
    if name not in DECAY_CURVES:
        raise ValueError(
            f"unknown WSM decay shape {shape!r}: expected one of "
            f"{sorted(DECAY_CURVES) + ['mean', 'uniform']} or a callable f(x) on [0, 1]"
        )
    return DECAY_CURVES[name]


def decay_factors(num_snapshots: int, shape: DecayShape) -> np.ndarray:
    """w_1 … w_k = f(i / (k + 1)) for k = num_snapshots - 1 update intervals. [k] float64."""
    if num_snapshots < 1:
        raise ValueError(f"num_snapshots = {num_snapshots}: expected >= 1")
    f = decay_curve(shape)
    k = num_snapshots - 1
    return np.asarray([float(f(i / (k + 1))) for i in range(1, k + 1)], np.float64)


def weights_from_decay(decay: np.ndarray | list[float]) -> np.ndarray:
    """The inverse formula: merge weights c_0 … c_k [k + 1] for decay factors w_1 … w_k [k].

    Raises if w is not non-increasing within [0, 1] (no non-negative weights emulate it).
    """
    w = np.asarray(decay, np.float64).reshape(-1)
    if w.size and (w.max() > 1 + _TOLERANCE or w.min() < -_TOLERANCE):
        raise ValueError(f"decay factors {w.tolist()} must lie in [0, 1]")
    if np.any(np.diff(w) > _TOLERANCE):
        raise ValueError(f"decay factors {w.tolist()} must be non-increasing")
    w = np.clip(w, 0.0, 1.0)
    # c_0 = 1 - w_1, c_j = w_j - w_{j+1}, c_k = w_k, written as differences of [1, w, 0].
    c = -np.diff(np.concatenate([[1.0], w, [0.0]]))
    return np.clip(c, 0.0, None)


def merge_weights(num_snapshots: int, shape: DecayShape = "linear") -> np.ndarray:
    """Weights c_0 … c_k of `num_snapshots` consecutive, evenly spaced snapshots (oldest first)
    that emulate the decay `shape` over the merge window. [num_snapshots] float64, sums to 1."""
    return weights_from_decay(decay_factors(num_snapshots, shape))


def emulated_decay(weights: np.ndarray | list[float]) -> np.ndarray:
    """The forward map: decay factors w_i = Σ_{j ≥ i} c_j (i = 1 … k) a merge applies. [k]"""
    c = np.asarray(weights, np.float64).reshape(-1)
    if c.size == 0 or np.any(c < 0) or not math.isclose(c.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"merge weights {c.tolist()} must be >= 0 and sum to 1")
    return np.cumsum(c[::-1])[::-1][1:]
