"""The experiment config: one nested ConfigDict holding every section a run needs.

    model       ling_jax.configs (a preset or a custom shape)
    data        ling_jax.data.default_data_config
    optim       AdamW, clipping, the expert-bias rate, the z-loss weight
    schedule    wsm (default) | cosine | wsd
    train       global batch, micro-batches, number of steps
    eval        evaluation cadence and size
    checkpoint  orbax snapshot cadence and retention
    logging     metric cadence and profiling
    mesh        device mesh axis sizes (data, fsdp, expert, tensor) within and across slices
    fp8         FP8 training and its safeguards: the model's own `model.fp8` section, exposed
                at the top level (`--config.fp8.enabled=True` is `--config.model.fp8.enabled`)
    seed        parameter initialisation and data order

`experiments/configs/*.py` build on `default_experiment_config()`; `validate_experiment_config`
runs once at start-up and names the offending field.
"""

from __future__ import annotations

import ml_collections

from ling_jax.configs import validate_model_config
from ling_jax.data.config import default_data_config, validate_data_config
from ling_jax.parallel.mesh import default_mesh_config
from ling_jax.train.checkpointing import default_checkpoint_config, validate_checkpoint_config
from ling_jax.train.config import (
    default_optim_config,
    default_schedule_config,
    default_train_config,
    validate_optim_config,
    validate_schedule_config,
    validate_train_config,
)
from ling_jax.train.finite import nonfinite_config_fields
from ling_jax.train.merged_eval import validate_merged_eval_config


def default_eval_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.every_steps = 100  # Evaluate on the validation split every this many steps and at the end.
    cfg.max_batches = 8  # Validation batches per evaluation; 0 means the whole split.
    # WSM: every this many steps also evaluate the merge of the latest snapshots, logged as
    # eval/merged_loss etc. (0 disables). A multiple of the snapshot spacing below.
    cfg.merged_every_steps = 0
    cfg.merged_num_snapshots = 8  # How many snapshots (the latest, the current step's included).
    cfg.merged_spacing = 0  # Merge only snapshots at multiples of this; 0: every snapshot.
    cfg.merged_decay_shape = "linear"  # Emulated decay: linear (mean), cosine or 1-sqrt.
    return cfg


def default_logging_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.log_every_steps = 10  # Write train/* metrics every this many steps.
    cfg.profile = False  # Capture a jax.profiler trace into the workdir.
    cfg.profile_first_step = 10  # First step of the profiled window.
    cfg.profile_num_steps = 5
    return cfg


def default_experiment_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = model
    cfg.data = default_data_config()
    cfg.optim = default_optim_config()
    cfg.schedule = default_schedule_config()
    cfg.train = default_train_config()
    cfg.eval = default_eval_config()
    cfg.checkpoint = default_checkpoint_config()
    cfg.logging = default_logging_config()
    cfg.mesh = default_mesh_config()
    # One section under two names: overriding either sets both (see the module docstring).
    cfg.fp8 = cfg.model.fp8
    cfg.seed = 0
    return cfg


def validate_experiment_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every section once; errors name the field (e.g. `optim.peak_lr`)."""
    expected = {
        "model",
        "data",
        "optim",
        "schedule",
        "train",
        "eval",
        "checkpoint",
        "logging",
        "mesh",
    }
    missing = expected - set(cfg.keys())
    if missing:
        raise ValueError(f"experiment config lacks the section(s) {sorted(missing)}")
    nonfinite = nonfinite_config_fields(cfg)
    if nonfinite:
        raise ValueError(
            "config field(s) "
            + ", ".join(f"`{name}` = {value!r}" for name, value in nonfinite)
            + " not finite: expected finite numbers"
        )
    validate_model_config(cfg.model)
    if "fp8" in cfg and cfg.fp8.to_dict() != cfg.model.fp8.to_dict():
        raise ValueError(
            f"fp8 = {cfg.fp8.to_dict()} disagrees with model.fp8 = {cfg.model.fp8.to_dict()}: "
            "they are one section (set cfg.fp8 = cfg.model.fp8 after replacing cfg.model)"
        )
    validate_data_config(cfg.data)
    validate_optim_config(cfg.optim)
    validate_schedule_config(cfg.schedule)
    validate_train_config(cfg.train)
    validate_checkpoint_config(cfg.checkpoint)
    for section, field in (("eval", "every_steps"), ("logging", "log_every_steps")):
        if not cfg[section][field] > 0:
            raise ValueError(f"{section}.{field} = {cfg[section][field]!r}: expected > 0")
    if cfg.eval.max_batches < 0:
        raise ValueError(f"eval.max_batches = {cfg.eval.max_batches!r}: expected >= 0")
    validate_merged_eval_config(cfg)
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise ValueError(
            f"data.seq_len = {cfg.data.seq_len} exceeds model.max_position_embeddings = "
            f"{cfg.model.max_position_embeddings}"
        )
    return cfg
