"""The fitted Ling scaling laws (arXiv 2507.17702; SPEC section 7.2).

Units, throughout: compute `C` in training FLOPs (`C = M * D`), `M` in non-embedding training
FLOPs per token (`ling_jax.model.counting.non_embedding_flops_per_token`), `D` and batch sizes
in tokens, the learning rate as the peak AdamW rate.

The laws were fitted on 3e17-3e20 FLOPs with a 64-expert top-4 + 1 shared MoE (A = 7.8%,
G = 2) and validated for A = 4.7%-10.9%; everything else is extrapolation. Evaluated at each
Ling 2.0 model's 20T-token compute, `optimal_lr` and `optimal_batch_tokens` reproduce the peak
learning rates and batch sizes of the Ling 2.0 report's Table 1 (SPEC section 2).

Log bases in the efficiency-leverage law. The paper does not state them (SPEC sections 7.2 and
13). We read `log G` as log2 and `log C` as log10 (C in FLOPs), the only reading that
reproduces the paper's figures: EL(A = 3.1%, G = 12, C = 1e22) = 7.24 ("over 7x"),
Ling-mini-beta (A = 13/385, G = 10.67) at 1e22 = 6.98, and the optimal granularity
2^(-beta / (2 gamma)) = 11.3 ("around 12"). Natural logs give EL ~ 1e3 and G* ~ 33; log10 for
both gives G* ~ 3,000.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

ARCHS = ("moe", "dense")

# Optimal hyperparameters (MoE): eta_opt = 1.1576 C^-0.1529, B_opt = 0.0694 C^0.3644 tokens.
LR_COEF, LR_EXP = 1.1576, -0.1529
BATCH_COEF, BATCH_EXP = 0.0694, 0.3644

# Compute-optimal allocation: arch -> ((M coefficient, M exponent), (D coefficient, D exponent)).
# The products of the coefficients are ~1 (1.0002 MoE, 0.9994 dense), so M_opt * D_opt ~ C.
ALLOCATION = {
    "moe": ((0.1915, 0.5095), (5.2232, 0.4905)),
    "dense": ((0.0655, 0.5422), (15.2582, 0.4578)),
}

# Table 2 of the paper: the joint efficiency-leverage law and its saturating activation.
EL_A, EL_D, EL_GAMMA, EL_BETA = 1.23, -7.61e-2, 1.67e-2, -1.17e-1
A_START, A_MAX = 1.63e-2, 5.28e16


def _positive(name: str, value: ArrayLike) -> np.ndarray | float:
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(f"{name} = {value!r} is invalid: expected positive finite values")
    return float(arr) if arr.ndim == 0 else arr


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch = {arch!r} is invalid: expected one of {ARCHS}")


def optimal_lr(compute: ArrayLike) -> np.ndarray | float:
    """Compute-optimal peak learning rate eta_opt = 1.1576 * C^-0.1529.

    Ling-mini-2.0 at C = 1.36e23 gives 3.36e-4, its Table 1 value.
    """
    return LR_COEF * _positive("compute", compute) ** LR_EXP


def optimal_batch_tokens(compute: ArrayLike) -> np.ndarray | float:
    """Compute-optimal batch size in tokens, B_opt = 0.0694 * C^0.3644.

    Ling-mini-2.0 at C = 1.36e23 gives 1.87e7 tokens, about 4,560 sequences of 4096 tokens
    (Table 1: 4,400).
    """
    return BATCH_COEF * _positive("compute", compute) ** BATCH_EXP


def optimal_model_flops_per_token(compute: ArrayLike, arch: str = "moe") -> np.ndarray | float:
    """Compute-optimal non-embedding FLOPs per token: M_opt = 0.1915 C^0.5095 (MoE) or
    0.0655 C^0.5422 (dense)."""
    _check_arch(arch)
    (coef, exp), _ = ALLOCATION[arch]
    return coef * _positive("compute", compute) ** exp


def optimal_tokens(compute: ArrayLike, arch: str = "moe") -> np.ndarray | float:
    """Compute-optimal training tokens: D_opt = 5.2232 C^0.4905 (MoE) or 15.2582 C^0.4578
    (dense)."""
    _check_arch(arch)
    _, (coef, exp) = ALLOCATION[arch]
    return coef * _positive("compute", compute) ** exp


def compute_for_flops_per_token(
    flops_per_token: ArrayLike, arch: str = "moe"
) -> np.ndarray | float:
    """The budget C whose compute-optimal model has M FLOPs per token: M_opt^-1(M).

    Used to give a hand-shaped model (a ladder rung of chosen width and depth) the tokens,
    learning rate and batch size the laws assign to it: D = C / M = D_opt(C).
    """
    _check_arch(arch)
    (coef, exp), _ = ALLOCATION[arch]
    return (_positive("flops_per_token", flops_per_token) / coef) ** (1.0 / exp)


def saturating_activation(
    activation_ratio: ArrayLike, a_start: float = A_START, a_max: float = A_MAX
) -> np.ndarray | float:
    """The saturating transform of the activation ratio (after Clark et al. 2022):

        1 / A_hat = 1 / (A + (1 / A_start - 1 / A_max)^-1) + 1 / A_max.

    A_hat ~ A + A_start for A well above A_start, and saturates at A_start as A -> 0, so the
    predicted leverage stops growing for extremely sparse models.
    """
    a = _positive("activation_ratio", activation_ratio)
    offset = 1.0 / (1.0 / a_start - 1.0 / a_max)
    return 1.0 / (1.0 / (a + offset) + 1.0 / a_max)


def efficiency_leverage(
    activation_ratio: ArrayLike, granularity: ArrayLike, compute: ArrayLike
) -> np.ndarray | float:
    """The joint efficiency-leverage law of the paper's Table 2:

        EL(A, G, C) = A_hat^(alpha + gamma (log2 G)^2 + beta log2 G),  alpha = a + d log10 C,

    with a = 1.23, d = -7.61e-2, gamma = 1.67e-2, beta = -1.17e-1 (log bases: see the module
    docstring). EL is the dense compute that reaches the MoE model's loss, divided by the MoE
    compute. Ling 2.0's shape (A = 9/257, G = 8) gives 6.79 at 1e22 FLOPs.
    """
    a_hat = saturating_activation(activation_ratio)
    log_g = np.log2(_positive("granularity", granularity))
    alpha = EL_A + EL_D * np.log10(_positive("compute", compute))
    exponent = alpha + EL_GAMMA * log_g**2 + EL_BETA * log_g
    el = a_hat**exponent
    return float(el) if np.ndim(el) == 0 else el


def optimal_granularity() -> float:
    """The granularity minimising the EL exponent: G* = 2^(-beta / (2 gamma)) = 11.3.

    The exponent multiplies log A_hat < 0, so the leverage is largest where the G-dependent
    part of the exponent, gamma (log2 G)^2 + beta log2 G, is smallest. G* does not depend on A
    or C.
    """
    return float(2.0 ** (-EL_BETA / (2.0 * EL_GAMMA)))
