"""The CPU wind tunnel: five MoE models whose loss-vs-compute fit predicts the next size up.

    python -m experiments.wind_tunnel --root=runs/wind_tunnel          # ladder + fit + plots
    python -m experiments.sweep --config=experiments/configs/wind_tunnel_micro.py --root=DIR
    python -m experiments.run --config=experiments/configs/wind_tunnel_micro.py:m --workdir=DIR

Rungs are hand-spaced (width, depth) pairs, as in the paper's ladder (8/384 ... 22/1280), with a
Ling-style MoE from (A, G) by `ling_jax.scaling.plan_shape`: 32 experts of width d/2 (G = 4),
top-3 + 1 shared (A = 4/33), first layer dense, one MTP layer. Each rung trains
`TOKEN_SCALE` x D_opt(C) tokens, where C is the budget whose compute-optimal model has this
rung's M, so D grows as C^0.49 between rungs as the law says; the scale fits the largest run
into one pass over the embedded corpus. LR and batch follow eta_opt(C) and B_opt(C) at the
compute actually spent. All five run in about 30 minutes on a 2-core CPU.
"""

from __future__ import annotations

import ml_collections

from experiments.sweeps.spec import Sweep
from experiments.sweeps.wind_tunnel import Ladder
from ling_jax.scaling.planner import cpu_overrides, plan_shape

CONFIG_FILE = "experiments/configs/wind_tunnel_micro.py"
SEQ_LEN = 256
VOCAB = 2048
TOKEN_SCALE = 0.025
# rung -> (d_model, layers): width x 1.25-1.5 and depth +0-1 per rung.
SHAPES = {"xs": (64, 2), "s": (96, 2), "m": (96, 3), "l": (128, 3), "xl": (160, 4)}
MOE = {"head_dim": 32, "activation_ratio": 1 / 8, "granularity": 4.0}
WARMUP_FRACTION = 0.05
OVERRIDES = {
    "data.source": "embedded",
    "data.bpe_vocab_size": VOCAB,
    "eval.max_batches": 16,
    "logging.log_every_steps": 50,
    "optim.bias_update_rate": 1e-2,  # Short runs: the expert bias must move faster.
}


def ladder(token_scale: float = TOKEN_SCALE) -> Ladder:
    plans = {
        rung: plan_shape(
            d_model,
            layers,
            seq_len=SEQ_LEN,
            vocab_size=VOCAB,
            token_scale=token_scale,
            config_overrides=cpu_overrides(SEQ_LEN),
            **MOE,
        )
        for rung, (d_model, layers) in SHAPES.items()
    }
    return Ladder(plans, warmup_fraction=WARMUP_FRACTION, overrides=OVERRIDES)


def get_config(rung: str = "xs") -> ml_collections.ConfigDict:
    return ladder().experiment_config(rung)


def get_sweep() -> Sweep:
    return ladder().sweep("wind_tunnel_micro", CONFIG_FILE)
