"""Pretraining Ling-flash-2.0 (102.9B total, 6.15B active),
with the paper's recipe (Table 1: peak LR 2.61e-4, 8352 x 4K sequences).

    python -m experiments.run --config=experiments/configs/ling_flash_2.py \
        --workdir=gs://bucket/run \
        --config.data.train_files='gs://bucket/data/*.arrayrecord' \
        --config.data.tokenizer=/path/to/tokenizer.json
"""

from __future__ import annotations

import ml_collections

from experiments.configs.pretrain_recipe import recipe_config
from ling_jax.configs import get_preset

# Verified with `python -m experiments.aot --config=experiments/configs/ling_flash_2.py:aot`: the
# full train step compiles for this topology and fits in HBM per chip at this global batch (one
# 4K sequence per chip) and these config fields (FSDP over the whole slice): 74.7 of 95 GiB per
# chip. README, "Running on TPU".
VERIFIED_TOPOLOGY = "v5p-64"
VERIFIED_BATCH = 64
VERIFIED_OVERRIDES = {"mesh.ici.data": 1, "mesh.ici.fsdp": -1, "mesh.ici.expert": 1}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The recipe; `variant="aot"` (`--config=...ling_flash_2.py:aot`): at its verified shape."""
    return recipe_config(
        get_preset("ling_flash_2"),
        variant,
        peak_lr=2.61e-4,
        batch_sequences=8352,
        verified=(VERIFIED_TOPOLOGY, VERIFIED_BATCH, VERIFIED_OVERRIDES),
    )
