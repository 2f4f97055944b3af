"""The `optim`, `schedule` and `train` sections of an experiment config.

Each `default_*_config()` returns a fresh section with every field documented; the matching
`validate_*_config` checks it once at start-up and raises a `ValueError` naming the offending
field and what was expected.

Defaults follow the Ling 2.0 pretraining recipe (SPEC section 6): AdamW (0.9, 0.95), eps 1e-8,
weight decay 0.1 (not on norm scales), grad clip 1.0, bias update rate 1e-3, WSM schedule
(linear warmup, then constant), no router z-loss.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from ling_jax.train.finite import NONFINITE_MODES

SCHEDULE_TYPES = ("wsm", "cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt", "exponential")


def default_optim_config() -> ml_collections.ConfigDict:
    """AdamW with global-norm clipping, plus the aux-loss-free bias update and the z-loss."""
    cfg = ml_collections.ConfigDict()
    # Peak learning rate (Ling-mini-2.0 Table 1: 3.36e-4; flash 2.61e-4; 1T 1.86e-4).
    cfg.peak_lr = 3e-4
    # AdamW moments and epsilon (Megatron defaults, SPEC section 6).
    cfg.b1 = 0.9
    cfg.b2 = 0.95
    cfg.eps = 1e-8
    # Decoupled weight decay, multiplied by the learning rate; never applied to norm scales
    # or biases (1-D parameters once the stacked layer axis is removed).
    cfg.weight_decay = 0.1
    # Clip the gradient to this global L2 norm before Adam; 0 disables clipping.
    cfg.grad_clip = 1.0
    # u of the zero-mean sign update of the expert biases (SPEC 5.1): 1e-3 during 4K
    # pretraining, 1e-4 after context extension. 0 freezes the biases.
    cfg.bias_update_rate = 1e-3
    # Weight of the router z-loss (summed over every router, the MTP layer's included);
    # 0 in the original recipe, 3.5e-6 in the open-source continued-pretraining demo.
    cfg.z_loss_weight = 0.0
    return cfg


def default_schedule_config() -> ml_collections.ConfigDict:
    """The learning-rate schedule; `make_schedule` in `ling_jax.train.schedules` builds it."""
    cfg = ml_collections.ConfigDict()
    # "wsm": linear warmup then constant (Ling 2.0, annealing comes from checkpoint merging);
    # "cosine": warmup then cosine to final_lr_fraction * peak at total_steps;
    # "wsd": warmup, constant, then decay over the last decay_fraction of total_steps.
    cfg.type = "wsm"
    # Linear warmup from 0 to the peak: lr(t) = peak * t / warmup_steps for t < warmup_steps.
    cfg.warmup_steps = 2000
    # Length of the run; cosine and wsd reach their final value here (unused by wsm).
    cfg.total_steps = 100_000
    # wsd: fraction of total_steps spent decaying (at the end of the run).
    cfg.decay_fraction = 0.1
    # wsd: "linear", "1-sqrt" (the WSM paper's baseline) or "exponential" (scaling-law runs).
    cfg.decay_shape = "1-sqrt"
    # cosine and wsd: the final learning rate as a fraction of the peak.
    cfg.final_lr_fraction = 0.1
    return cfg


def default_train_config() -> ml_collections.ConfigDict:
    """Global batch, gradient accumulation and loss weights of one optimizer step."""
    cfg = ml_collections.ConfigDict()
    # Sequences per optimizer step (the global batch, across all devices).
    cfg.batch_size = 8
    # Gradient accumulation: the global batch is split into this many micro-batches that run
    # one after another; the step's gradient equals the full-batch gradient.
    cfg.micro_batches = 1
    # Optimizer steps of the run (the training loop stops here).
    cfg.num_steps = 1000
    # Weight of the MTP cross-entropy; None takes the model's `mtp.loss_weight` (0.1).
    cfg.mtp_loss_weight = config_dict.placeholder(float)
    # A step whose loss or gradient norm is NaN/inf: "stop" ends the run with an error (no
    # snapshot of that state is saved); "skip" leaves params, optimizer state and expert biases
    # unchanged for that step (the batch is consumed) and stops only after
    # `max_nonfinite_skips` such steps in a row. Checked one step late: no extra host sync.
    cfg.on_nonfinite = "stop"
    cfg.max_nonfinite_skips = 10
    return cfg


def _fail(section: str, field: str, value, expected: str) -> None:
    raise ValueError(
        f"{section} config field `{section}.{field}` = {value!r} is invalid: expected {expected}"
    )


def validate_optim_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the `optim` section once, naming the offending field; returns it unchanged."""
    if not cfg.peak_lr > 0:
        _fail("optim", "peak_lr", cfg.peak_lr, "a positive number")
    for field in ("b1", "b2"):
        if not 0 <= cfg[field] < 1:
            _fail("optim", field, cfg[field], "in [0, 1)")
    if not cfg.eps > 0:
        _fail("optim", "eps", cfg.eps, "a positive number")
    for field in ("weight_decay", "grad_clip", "bias_update_rate", "z_loss_weight"):
        if not cfg[field] >= 0:
            _fail("optim", field, cfg[field], ">= 0")
    return cfg


def validate_schedule_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the `schedule` section once, naming the offending field; returns it unchanged."""
    if cfg.type not in SCHEDULE_TYPES:
        _fail("schedule", "type", cfg.type, f"one of {SCHEDULE_TYPES}")
    if cfg.warmup_steps < 0:
        _fail("schedule", "warmup_steps", cfg.warmup_steps, ">= 0")
    if cfg.type == "wsm":
        return cfg
    if not 0 <= cfg.final_lr_fraction <= 1:
        _fail("schedule", "final_lr_fraction", cfg.final_lr_fraction, "in [0, 1]")
    if cfg.total_steps <= cfg.warmup_steps:
        _fail(
            "schedule",
            "total_steps",
            cfg.total_steps,
            f"> schedule.warmup_steps={cfg.warmup_steps} for a {cfg.type!r} schedule",
        )
    if cfg.type == "wsd":
        if cfg.decay_shape not in DECAY_SHAPES:
            _fail("schedule", "decay_shape", cfg.decay_shape, f"one of {DECAY_SHAPES}")
        if cfg.decay_shape == "exponential" and not cfg.final_lr_fraction > 0:
            _fail(
                "schedule",
                "final_lr_fraction",
                cfg.final_lr_fraction,
                "> 0 for an exponential decay",
            )
        if not 0 < cfg.decay_fraction <= 1:
            _fail("schedule", "decay_fraction", cfg.decay_fraction, "in (0, 1]")
        if decay_steps(cfg) + cfg.warmup_steps > cfg.total_steps:
            _fail(
                "schedule",
                "decay_fraction",
                cfg.decay_fraction,
                f"a decay of at most total_steps - warmup_steps = "
                f"{cfg.total_steps - cfg.warmup_steps} steps",
            )
    return cfg


def decay_steps(cfg: ml_collections.ConfigDict) -> int:
    """Length of the wsd decay phase in steps (at least one)."""
    return max(1, round(cfg.decay_fraction * cfg.total_steps))


def validate_train_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the `train` section once, naming the offending field; returns it unchanged."""
    if cfg.batch_size < 1:
        _fail("train", "batch_size", cfg.batch_size, ">= 1")
    if cfg.micro_batches < 1:
        _fail("train", "micro_batches", cfg.micro_batches, ">= 1")
    if cfg.batch_size % cfg.micro_batches:
        _fail(
            "train",
            "micro_batches",
            cfg.micro_batches,
            f"a divisor of train.batch_size={cfg.batch_size}",
        )
    if cfg.num_steps < 1:
        _fail("train", "num_steps", cfg.num_steps, ">= 1")
    if cfg.mtp_loss_weight is not None and not cfg.mtp_loss_weight >= 0:
        _fail("train", "mtp_loss_weight", cfg.mtp_loss_weight, ">= 0 or None (model default)")
    if cfg.on_nonfinite not in NONFINITE_MODES:
        _fail("train", "on_nonfinite", cfg.on_nonfinite, f"one of {NONFINITE_MODES}")
    if cfg.max_nonfinite_skips < 0:
        _fail("train", "max_nonfinite_skips", cfg.max_nonfinite_skips, ">= 0")
    return cfg
