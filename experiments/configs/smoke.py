"""A short run of the whole job (data, model with MTP, checkpoints, eval) for CI and debugging,
about a minute on 2 CPU cores (mostly imports, BPE training and compilation):

    python -m experiments.run --config=experiments/configs/smoke.py --workdir=/tmp/smoke
"""

from __future__ import annotations

import ml_collections

from ling_jax.configs import get_preset
from ling_jax.train.experiment import default_experiment_config


def get_config() -> ml_collections.ConfigDict:
    model = get_preset("tiny")
    model.vocab_size = 320
    cfg = default_experiment_config(model)
    cfg.data.source = "embedded"
    cfg.data.bpe_vocab_size = 300
    cfg.data.tokenizer_train_max_bytes = 200_000
    cfg.data.seq_len = 32
    cfg.data.batch_prefetch = 0
    cfg.train.batch_size = 8
    cfg.train.num_steps = 6
    cfg.optim.peak_lr = 3e-3
    cfg.schedule.warmup_steps = 2
    cfg.eval.every_steps = 3
    cfg.eval.max_batches = 2
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.max_to_keep = 0
    cfg.logging.log_every_steps = 1
    return cfg
