"""The Ling 2.0 pretraining recipe shared by the mini, flash and 1T configs (SPEC section 6).

AdamW (0.9, 0.95), weight decay 0.1 (not on norms), clip 1.0, init std 0.006, WSM (2,000 warmup
steps, then constant: annealing comes from checkpoint merging), MTP weight 0.1, expert-bias rate
1e-3, 4K context, bf16 compute with fp32 master weights, 20T tokens. Each size supplies its
Table 1 peak LR and batch (in 4,096-token sequences).
"""

from __future__ import annotations

import ml_collections

from ling_jax.train.experiment import default_experiment_config

SEQ_LEN = 4096
TRAINING_TOKENS = 20e12


def pretrain_config(
    model: ml_collections.ConfigDict, *, peak_lr: float, batch_sequences: int
) -> ml_collections.ConfigDict:
    cfg = default_experiment_config(model)
    cfg.model.init_std = 0.006
    cfg.model.dtype = "bfloat16"
    cfg.model.param_dtype = "float32"
    cfg.model.mtp.num_layers = 1
    cfg.model.mtp.loss_weight = 0.1
    cfg.model.remat = "full"
    # Bring your own data and Ling's tokenizer:
    #   --config.data.train_files='gs://bucket/pretrain/*.arrayrecord'
    #   --config.data.tokenizer=/path/to/Ling-mini-2.0/tokenizer.json
    cfg.data.source = "files"
    cfg.data.seq_len = SEQ_LEN
    cfg.optim.peak_lr = peak_lr
    cfg.optim.b1, cfg.optim.b2 = 0.9, 0.95
    cfg.optim.weight_decay = 0.1
    cfg.optim.grad_clip = 1.0
    cfg.optim.bias_update_rate = 1e-3
    cfg.schedule.type = "wsm"
    cfg.schedule.warmup_steps = 2000
    cfg.train.batch_size = batch_sequences
    cfg.train.num_steps = round(TRAINING_TOKENS / (batch_sequences * SEQ_LEN))
    cfg.eval.every_steps = 1000
    cfg.eval.max_batches = 64
    cfg.checkpoint.every_steps = 1000
    cfg.checkpoint.max_to_keep = 4
    cfg.checkpoint.keep_period = 5000  # WSM merges these snapshots (experiments.merge).
    cfg.logging.log_every_steps = 10
    # Fully sharded within a slice (parameters, optimizer state and batch over every chip of
    # the slice), data parallel across slices. Add experts with --config.mesh.ici.expert=8.
    cfg.mesh.ici.data = 1
    cfg.mesh.ici.fsdp = -1
    cfg.mesh.dcn.data = -1
    return cfg
