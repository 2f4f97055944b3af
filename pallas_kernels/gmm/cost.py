"""Cost estimates of the grouped matmuls, shared by the TPU and GPU kernels (XLA schedules
around a custom call by these)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gmm_cost(lhs: jax.Array, rhs: jax.Array, c: int, out_dtype, tn: int) -> pl.CostEstimate:
    """out [m, c] = lhs [m, r] @ rhs[g]: lhs is read once per column block of width tn."""
    m, r = lhs.shape
    return pl.CostEstimate(
        flops=2 * m * r * c,
        transcendentals=0,
        bytes_accessed=int(
            lhs.size * lhs.dtype.itemsize * _cdiv(c, tn)
            + rhs.size * rhs.dtype.itemsize
            + m * c * jnp.dtype(out_dtype).itemsize
        ),
    )


def tgmm_cost(
    lhs: jax.Array, grad: jax.Array, num_local: int, out_dtype, tk: int, tn: int
) -> pl.CostEstimate:
    """out [num_local, k, n] = lhs^T @ grad per group: lhs is read once per n block, grad
    once per k block."""
    (m, k), n = lhs.shape, grad.shape[1]
    return pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=int(
            lhs.size * lhs.dtype.itemsize * _cdiv(n, tn)
            + grad.size * grad.dtype.itemsize * _cdiv(k, tk)
            + num_local * k * n * jnp.dtype(out_dtype).itemsize
        ),
    )
