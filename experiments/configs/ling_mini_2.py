"""Pretraining Ling-mini-2.0 (16.26B total, 1.43B active),
with the paper's recipe (Table 1: peak LR 3.36e-4, 4400 x 4K sequences).

    python -m experiments.run --config=experiments/configs/ling_mini_2.py \
        --workdir=gs://bucket/run \
        --config.data.train_files='gs://bucket/data/*.arrayrecord' \
        --config.data.tokenizer=/path/to/tokenizer.json
"""

from __future__ import annotations

import ml_collections

from experiments.configs.pretrain_recipe import pretrain_config
from ling_jax.configs import get_preset


def get_config() -> ml_collections.ConfigDict:
    return pretrain_config(get_preset("ling_mini_2"), peak_lr=3.36e-4, batch_sequences=4400)
