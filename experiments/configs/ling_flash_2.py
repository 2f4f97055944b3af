"""Pretraining Ling-flash-2.0 (102.9B total, 6.15B active),
with the paper's recipe (Table 1: peak LR 2.61e-4, 8352 x 4K sequences).

    python -m experiments.run --config=experiments/configs/ling_flash_2.py \
        --workdir=gs://bucket/run \
        --config.data.train_files='gs://bucket/data/*.arrayrecord' \
        --config.data.tokenizer=/path/to/tokenizer.json
"""

from __future__ import annotations

import ml_collections

from experiments.configs.pretrain_recipe import pretrain_config
from ling_jax.configs import get_preset


def get_config() -> ml_collections.ConfigDict:
    return pretrain_config(get_preset("ling_flash_2"), peak_lr=2.61e-4, batch_sequences=8352)
