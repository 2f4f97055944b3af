"""The quickstart model and data trained three ways over the same tokens: WSM (constant LR, to be
merged), WSD (1-sqrt decay to 0 over the last 20%) and cosine (to 0). Used by
`python -m experiments.wsm_compare`; one run by hand:

    python -m experiments.run --config=experiments/configs/wsm_compare.py:wsm --workdir=runs/wsm

The argument is `<schedule>[,<num_steps>]` (default `wsm,400`). The WSM run snapshots every
`SNAPSHOT_EVERY` steps and keeps the latest 16 (the merge windows of the comparison) plus the
step where WSD starts decaying (WSD branches from there: until then both schedules agree).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import quickstart
from ling_jax.train.config import decay_steps

NUM_STEPS = 400
DECAY_FRACTION = 0.2  # WSD decays over the last 20% of the run (80 of 400 steps).
SNAPSHOT_EVERY = 10  # WSM snapshot spacing: 8 snapshots span the 80-step WSD decay window.
MERGE_SNAPSHOTS = 8


def parse_arg(arg: str) -> tuple[str, int]:
    schedule, _, steps = (arg or "wsm").partition(",")
    return schedule, int(steps) if steps else NUM_STEPS


def branch_step(cfg: ml_collections.ConfigDict) -> int:
    """The step where the WSD decay starts: WSM and WSD agree up to here."""
    return cfg.train.num_steps - decay_steps(cfg.schedule)


def get_config(arg: str = "wsm") -> ml_collections.ConfigDict:
    schedule, num_steps = parse_arg(arg)
    cfg = quickstart.get_config()
    cfg.train.num_steps = num_steps
    cfg.schedule.type = schedule
    cfg.schedule.warmup_steps = 30
    cfg.schedule.total_steps = num_steps
    cfg.schedule.decay_fraction = DECAY_FRACTION
    cfg.schedule.decay_shape = "1-sqrt"
    cfg.schedule.final_lr_fraction = 0.0
    cfg.eval.every_steps = 100
    cfg.eval.max_batches = 16
    if schedule == "wsm":
        cfg.checkpoint.every_steps = SNAPSHOT_EVERY
        cfg.checkpoint.max_to_keep = 16
        cfg.checkpoint.keep_period = branch_step(cfg)
        # The merge of the latest 8 snapshots, evaluated alongside the constant-LR weights.
        cfg.eval.merged_every_steps = 100
        cfg.eval.merged_num_snapshots = MERGE_SNAPSHOTS
    else:
        cfg.checkpoint.every_steps = 100
        cfg.checkpoint.max_to_keep = 2
    return cfg
