"""RL on the arithmetic set from the quickstart SFT run (LPO, Evo-CoT rewards), on a CPU.

    python -m experiments.rl --config=experiments/configs/rl_quickstart.py --workdir=runs/rl \\
        --config.rl.init_from=runs/sft

For Ling-mini-2.0 on TPU use the same `rl` section with `optim` from
`experiments/configs/sft_ling_mini_2.py` and rl.init_from its SFT run.
"""

from __future__ import annotations

import ml_collections

from ling_jax.posttrain.rl import default_rl_config
from ling_jax.train.config import default_optim_config, default_schedule_config


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.rl = default_rl_config()
    cfg.rl.init_from = "runs/sft"
    cfg.rl.max_new_tokens = 64  # A worked 3-operand solution is ~40 tokens of the 2048-BPE.
    cfg.optim = default_optim_config()
    cfg.optim.peak_lr = 1e-4
    cfg.optim.weight_decay = 0.0
    cfg.schedule = default_schedule_config()
    cfg.schedule.type = "wsm"  # Warmup, then constant.
    cfg.schedule.warmup_steps = 5
    return cfg
