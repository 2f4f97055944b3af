"""The CPU wind tunnel: five MoE models whose loss-vs-compute fit predicts the next size up.

    python -m experiments.wind_tunnel --root=runs/wind_tunnel          # ladder + fit + plots
    python -m experiments.sweep --config=experiments/configs/wind_tunnel_micro.py --root=DIR
    python -m experiments.run --config=experiments/configs/wind_tunnel_micro.py:m --workdir=DIR

Rungs are hand-spaced (width, depth) pairs, as in the paper's ladder (8/384 ... 22/1280), each
about twice the compute of the one before, with the quickstart's MoE shaped by
`ling_jax.scaling.plan_shape` from (A, G): 32 experts of width d/2 (G = 4), top-4 + 1 shared
(A = 5/33), the first layer dense, one MTP layer. Each rung trains `TOKEN_SCALE` x D_opt(C)
tokens, where C is the budget whose compute-optimal model has this rung's M, so D grows as
C^0.49 between rungs as the law says; the scale keeps the largest run within one pass over the
embedded corpus. The peak LR is `LR_SCALE` x eta_opt(C) and the batch B_opt(C) at the compute
actually spent: both laws were fitted at 3e17-3e20 FLOPs, and eta_opt extrapolated five decades
down (0.02) is too high for these models, hence the scale. Weights start at Ling's init_std
scaled to the rung's width (`width_scaled_init_std`: 0.006 at d = 2048, 0.034 at d = 64): at a
fixed 0.006 the seed alone moved a rung's final loss by up to 0.25 nats. Attention is
multi-head at every rung (as many KV heads as query heads). Every rung is evaluated on the
whole held-out split, made of whole top-level stdlib packages (`data.validation_split_by =
"group"`: on CPython 3.11, 16 packages and 10% of the stdlib bytes). Split by file, the 39
held-out files included codec tables whose near-twins were trained on, and one file was 20%
of the split. Training rows are shuffled in windows of 4096 (`data.row_shuffle_window`): packing
lays each file out as consecutive rows, so a rung's final LR decay otherwise saw a few files
(about half of the s rung's decay was typing.py and enum.py), different for every rung. All
five run in about 30 minutes on a 2-core CPU.
"""

from __future__ import annotations

import ml_collections

from experiments.sweeps.spec import Sweep
from experiments.sweeps.wind_tunnel import Ladder
from ling_jax.scaling.planner import cpu_overrides, plan_shape, width_scaled_init_std

CONFIG_FILE = "experiments/configs/wind_tunnel_micro.py"
SEQ_LEN = 256
VOCAB = 512
TOKEN_SCALE = 0.1
LR_SCALE = 0.4
WARMUP_FRACTION = 0.05
# rung -> (d_model, layers): budgets about 2x apart.
SHAPES = {"xs": (48, 2), "s": (64, 2), "m": (64, 3), "l": (80, 3), "xl": (96, 3)}
# The quickstart's MoE: 32 experts of width d/2 (G = 4), top-4 + 1 shared (A = 5/33).
MOE = {"head_dim": 16, "activation_ratio": 5 / 33, "granularity": 4.0, "ffn_ratio": 2.5}
OVERRIDES = {
    "data.source": "embedded",
    "data.bpe_vocab_size": VOCAB,
    "data.validation_split_by": "group",  # Whole packages: no near-duplicates across the split.
    # Packed rows shuffled in windows of 4096 rows (1M tokens, a whole small rung): without
    # it a rung's last 10% (its LR decay) was filled by a handful of long files.
    "data.row_shuffle_window": 4096,
    "eval.max_batches": 0,  # The whole held-out split: the same tokens for every rung.
    "logging.log_every_steps": 50,
    "optim.bias_update_rate": 1e-2,  # Short runs: the expert bias must move faster.
}


def model_overrides(d_model: int) -> dict:
    """The CPU model fields (float32, short RoPE), an init scaled to the rung's width, and
    one KV head per query head: the planner's GQA rule gives 5 heads (d = 80) a single KV
    head, which cost that rung 0.10 nats (3.345 against 3.242 with five)."""
    return {
        **cpu_overrides(SEQ_LEN),
        "init_std": width_scaled_init_std(d_model),
        "num_kv_heads": d_model // MOE["head_dim"],
    }


def ladder(token_scale: float = TOKEN_SCALE) -> Ladder:
    plans = {
        rung: plan_shape(
            d_model,
            layers,
            seq_len=SEQ_LEN,
            vocab_size=VOCAB,
            token_scale=token_scale,
            config_overrides=model_overrides(d_model),
            **MOE,
        )
        for rung, (d_model, layers) in SHAPES.items()
    }
    return Ladder(plans, lr_scale=LR_SCALE, warmup_fraction=WARMUP_FRACTION, overrides=OVERRIDES)


def get_config(rung: str = "xs") -> ml_collections.ConfigDict:
    return ladder().experiment_config(rung)


def get_sweep() -> Sweep:
    return ladder().sweep("wind_tunnel_micro", CONFIG_FILE)
