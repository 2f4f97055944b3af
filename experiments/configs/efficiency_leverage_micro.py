"""The micro efficiency-leverage experiment: a 1/32-activation MoE against dense, on this CPU.

    python -m experiments.wind_tunnel --root=runs/wind_tunnel   # runs this with the ladder
    python -m experiments.sweep --config=experiments/configs/efficiency_leverage_micro.py \\
        --root=runs/wind_tunnel/leverage

Two three-rung families on the same data and rung shapes (d_model, layers) = (48, 2), (64, 2),
(64, 3): a MoE with 64 experts of width d_model (G = 2), top-1 + 1 shared (A = 2/65 = 3.1%),
and a dense SwiGLU model with d_ffn = 3.5 d_model. Each family follows its own compute-optimal
allocation (as in the paper's EL definition, which compares compute-optimal loss curves), with
the micro ladder's token and LR scales. Their compute ranges overlap; the leverage is
C_dense / C_MoE at equal loss from the two power-law fits, next to the law's EL(A, G, C).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import wind_tunnel_micro as micro
from experiments.sweeps.spec import Sweep
from experiments.sweeps.wind_tunnel import Ladder
from ling_jax.scaling.planner import plan_shape

CONFIG_FILE = "experiments/configs/efficiency_leverage_micro.py"
SHAPES = {"1": (48, 2), "2": (64, 2), "3": (64, 3)}
FAMILIES = {
    "moe": {"arch": "moe", "activation_ratio": 2 / 65, "granularity": 2.0},
    "dense": {"arch": "dense"},
}


def ladder(family: str) -> Ladder:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: expected one of {list(FAMILIES)}")
    plans = {
        f"{family}_{rung}": plan_shape(
            d_model,
            layers,
            head_dim=micro.MOE["head_dim"],
            seq_len=micro.SEQ_LEN,
            vocab_size=micro.VOCAB,
            token_scale=micro.TOKEN_SCALE,
            config_overrides=micro.model_overrides(d_model),
            **FAMILIES[family],
        )
        for rung, (d_model, layers) in SHAPES.items()
    }
    return Ladder(
        plans,
        lr_scale=micro.LR_SCALE,
        warmup_fraction=micro.WARMUP_FRACTION,
        overrides=micro.OVERRIDES,
    )


def get_config(point: str = "moe_1") -> ml_collections.ConfigDict:
    family = point.split("_")[0]
    return ladder(family).experiment_config(point)


def get_sweep() -> Sweep:
    points = []
    for family in FAMILIES:
        points += ladder(family).sweep("efficiency_leverage_micro", CONFIG_FILE).points
    return Sweep("efficiency_leverage_micro", tuple(points))
