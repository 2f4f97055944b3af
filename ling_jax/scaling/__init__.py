"""Ling scaling laws, loss-curve fits and wind-tunnel planning (SPEC section 7).

laws      the fitted laws: eta_opt, B_opt, M_opt / D_opt, the efficiency-leverage law
planner   a compute budget -> model config, tokens, LR and batch size
fitting   power-law fits of loss versus compute with bands, and the EL they imply
"""

from ling_jax.scaling.fitting import (
    EfficiencyLeverage,
    PowerLawFit,
    Prediction,
    fit_efficiency_leverage,
    fit_power_law,
)
from ling_jax.scaling.laws import (
    efficiency_leverage,
    optimal_batch_tokens,
    optimal_granularity,
    optimal_lr,
    optimal_model_flops_per_token,
    optimal_tokens,
    saturating_activation,
)
from ling_jax.scaling.planner import Plan, plan, plan_cpu

__all__ = [
    "EfficiencyLeverage",
    "Plan",
    "PowerLawFit",
    "Prediction",
    "efficiency_leverage",
    "fit_efficiency_leverage",
    "fit_power_law",
    "optimal_batch_tokens",
    "optimal_granularity",
    "optimal_lr",
    "optimal_model_flops_per_token",
    "optimal_tokens",
    "plan",
    "plan_cpu",
    "saturating_activation",
]
