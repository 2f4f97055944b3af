"""Pretraining Ling-1T (999.7B total, 51.1B active),
with the paper's recipe (Table 1: peak LR 1.86e-4, 18144 x 4K sequences).

    python -m experiments.run --config=experiments/configs/ling_1t.py \
        --workdir=gs://bucket/run \
        --config.data.train_files='gs://bucket/data/*.arrayrecord' \
        --config.data.tokenizer=/path/to/tokenizer.json
"""

from __future__ import annotations

import ml_collections

from experiments.configs.pretrain_recipe import pretrain_config
from ling_jax.configs import get_preset


def get_config() -> ml_collections.ConfigDict:
    return pretrain_config(get_preset("ling_1t"), peak_lr=1.86e-4, batch_sequences=18144)
