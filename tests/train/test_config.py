"""The optim / schedule / train config sections and their validation."""

from __future__ import annotations

import pytest

from ling_jax.train import config


def test_defaults_are_valid_and_follow_the_recipe():
    optim = config.validate_optim_config(config.default_optim_config())
    assert (optim.b1, optim.b2, optim.eps) == (0.9, 0.95, 1e-8)
    assert (optim.weight_decay, optim.grad_clip, optim.bias_update_rate) == (0.1, 1.0, 1e-3)
    assert optim.z_loss_weight == 0.0
    schedule = config.validate_schedule_config(config.default_schedule_config())
    assert schedule.type == "wsm"
    train = config.validate_train_config(config.default_train_config())
    assert train.mtp_loss_weight is None and train.micro_batches == 1


@pytest.mark.parametrize(
    "section, field, value, match",
    [
        ("optim", "peak_lr", 0.0, r"`optim.peak_lr` = 0.0 .*positive"),
        ("optim", "b2", 1.0, r"`optim.b2` = 1.0 .*\[0, 1\)"),
        ("optim", "grad_clip", -1.0, r"`optim.grad_clip`"),
        ("schedule", "type", "linear", r"`schedule.type` = 'linear' .*'wsm', 'cosine', 'wsd'"),
        ("schedule", "warmup_steps", -1, r"`schedule.warmup_steps`"),
        ("train", "micro_batches", 3, r"`train.micro_batches` = 3 .*divisor of .*=8"),
        ("train", "batch_size", 0, r"`train.batch_size`"),
        ("train", "mtp_loss_weight", -0.1, r"`train.mtp_loss_weight`"),
    ],
)
def test_invalid_fields_are_named(section, field, value, match):
    cfg = getattr(config, f"default_{section}_config")()
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        getattr(config, f"validate_{section}_config")(cfg)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(type="cosine", total_steps=100, warmup_steps=100), r"`schedule.total_steps` = 100"),
        (dict(type="wsd", decay_shape="cosine"), r"`schedule.decay_shape` = 'cosine' .*1-sqrt"),
        (dict(type="wsd", decay_fraction=0.0), r"`schedule.decay_fraction` = 0.0"),
        (
            dict(type="wsd", total_steps=100, warmup_steps=50, decay_fraction=0.6),
            r"`schedule.decay_fraction` = 0.6 .*at most .* 50 steps",
        ),
        (dict(type="cosine", final_lr_fraction=1.5), r"`schedule.final_lr_fraction` = 1.5"),
        (
            dict(type="wsd", decay_shape="exponential", final_lr_fraction=0.0),
            r"`schedule.final_lr_fraction` = 0.0 .*exponential",
        ),
    ],
)
def test_schedule_consistency(overrides, match):
    cfg = config.default_schedule_config()
    cfg.update(overrides)
    with pytest.raises(ValueError, match=match):
        config.validate_schedule_config(cfg)
