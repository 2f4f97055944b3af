"""DFT chat SFT of the quickstart model on the embedded arithmetic set (SPEC section 11).

Starts from a quickstart pretraining run's weights and tokenizer, trains on arithmetic
conversations in Ling's chat template (half "detailed thinking on", half "off"), with the loss on
assistant tokens only:

    python -m experiments.run --config=experiments/configs/quickstart.py --workdir=runs/quickstart
    python -m experiments.run --config=experiments/configs/sft_quickstart.py --workdir=runs/sft \\
        --config.checkpoint.init_from=runs/quickstart \\
        --config.data.tokenizer=runs/quickstart/tokenizer/tokenizer.json

`rl_quickstart.py` continues from this run.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import quickstart


def sft_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A pretraining config turned into chat SFT: chat data, both thinking modes, no MTP loss
    change (the MTP head keeps training on the same assistant tokens)."""
    cfg.data.chat = True
    cfg.data.chat_thinking = "mixed"
    cfg.data.row_shuffle_window = 0
    return cfg


def get_config() -> ml_collections.ConfigDict:
    cfg = sft_config(quickstart.get_config())
    cfg.data.source = "embedded"
    cfg.data.embedded_arithmetic_docs = 20000
    cfg.data.tokenizer = "runs/quickstart/tokenizer/tokenizer.json"
    cfg.checkpoint.init_from = "runs/quickstart"
    cfg.train.num_steps = 150
    cfg.optim.peak_lr = 1e-3
    cfg.schedule.type = "cosine"
    cfg.schedule.warmup_steps = 10
    cfg.schedule.total_steps = cfg.train.num_steps
    cfg.eval.every_steps = 50
    cfg.eval.max_batches = 8
    cfg.checkpoint.every_steps = 50
    return cfg
