"""The Ling 2.0 pretraining recipe shared by the mini, flash and 1T configs (SPEC section 6).

AdamW (0.9, 0.95), weight decay 0.1 (not on norms), clip 1.0, init std 0.006, WSM (2,000 warmup
steps, then constant: annealing comes from checkpoint merging), MTP weight 0.1, expert-bias rate
1e-3, 4K context, bf16 compute with fp32 master weights, 20T tokens. Each size supplies its
Table 1 peak LR and batch (in 4,096-token sequences).

Each size also names the TPU topology, global batch and config fields (the within-slice mesh)
on which `experiments.aot` compiled its full train step and found that it fits in HBM per chip:
`VERIFIED_TOPOLOGY`, `VERIFIED_BATCH`, `VERIFIED_OVERRIDES` (README, "Running on TPU").
`get_config("aot")`, on the command line `--config=experiments/configs/ling_1t.py:aot`, returns
the recipe at that shape with `aot.topology` set, so `python -m experiments.aot
--config=...:aot` needs no `--topology`. The Table 1 batch is reached from there with more
slices (`mesh.dcn.data`, data parallel over DCN) or gradient accumulation
(`train.micro_batches`), neither of which adds much per-chip memory.
"""

from __future__ import annotations

import ml_collections

from ling_jax.configs.fields import set_fields
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


def verified_shape(
    cfg: ml_collections.ConfigDict,
    *,
    topology: str,
    batch_sequences: int,
    overrides: dict[str, object],
) -> ml_collections.ConfigDict:
    """`cfg` at the topology, global batch (sequences) and dotted-field overrides (the within-
    slice mesh, e.g. {"mesh.ici.expert": 8}) on which `experiments.aot` verified that the train
    step fits."""
    set_fields(cfg, overrides)
    cfg.train.batch_size = batch_sequences
    cfg.train.num_steps = round(TRAINING_TOKENS / (batch_sequences * SEQ_LEN))
    cfg.aot = ml_collections.ConfigDict({"topology": topology})
    return cfg


def recipe_config(
    model: ml_collections.ConfigDict,
    variant: str,
    *,
    peak_lr: float,
    batch_sequences: int,
    verified: tuple[str, int, dict[str, object]],
) -> ml_collections.ConfigDict:
    """The recipe (`variant` "") or the recipe at its verified TPU shape (`variant` "aot");
    `verified` is (topology, batch in sequences, dotted-field overrides)."""
    cfg = pretrain_config(model, peak_lr=peak_lr, batch_sequences=batch_sequences)
    if variant == "aot":
        topology, batch, overrides = verified
        return verified_shape(cfg, topology=topology, batch_sequences=batch, overrides=overrides)
    if variant:
        raise ValueError(f"config variant {variant!r}: expected '' or 'aot'")
    return cfg
