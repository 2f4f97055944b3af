"""Learning-rate schedules against their closed forms."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from ling_jax.train.config import default_schedule_config
from ling_jax.train.schedules import make_schedule

PEAK = 3e-4


def _schedule(**overrides):
    cfg = default_schedule_config()
    cfg.update(overrides)
    return make_schedule(cfg, PEAK)


def _check(schedule, expected: dict[int, float]):
    for step, value in expected.items():
        np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-5, atol=1e-12)


def test_wsm_is_linear_warmup_then_constant():
    schedule = _schedule(type="wsm", warmup_steps=2000, total_steps=10)
    _check(schedule, {0: 0.0, 1: PEAK / 2000, 500: PEAK / 4, 2000: PEAK, 10**7: PEAK})


def test_wsm_without_warmup():
    _check(_schedule(type="wsm", warmup_steps=0), {0: PEAK, 7: PEAK})


def test_cosine():
    schedule = _schedule(type="cosine", warmup_steps=100, total_steps=1100, final_lr_fraction=0.1)
    final = 0.1 * PEAK

    def cos(step):
        return final + (PEAK - final) * 0.5 * (1 + math.cos(math.pi * (step - 100) / 1000))

    _check(schedule, {0: 0.0, 50: PEAK / 2, 100: PEAK, 350: cos(350), 600: (PEAK + final) / 2})
    _check(schedule, {1100: final, 5000: final})


@pytest.mark.parametrize(
    "shape, decayed",
    [
        ("linear", lambda x, final: PEAK - (PEAK - final) * x),
        ("1-sqrt", lambda x, final: final + (PEAK - final) * (1 - math.sqrt(x))),
        ("exponential", lambda x, final: PEAK * (final / PEAK) ** x),
    ],
)
def test_wsd(shape, decayed):
    # 1000 steps, decay over the last 20% (steps 800..1000), 10 warmup steps.
    schedule = _schedule(
        type="wsd",
        warmup_steps=10,
        total_steps=1000,
        decay_fraction=0.2,
        decay_shape=shape,
        final_lr_fraction=0.05,
    )
    final = 0.05 * PEAK
    _check(schedule, {0: 0.0, 5: PEAK / 2, 10: PEAK, 500: PEAK, 800: PEAK})
    _check(schedule, {850: decayed(0.25, final), 900: decayed(0.5, final), 1000: final})
    _check(schedule, {2000: final})


def test_schedule_is_jittable():
    schedule = _schedule(type="wsd", warmup_steps=10, total_steps=100, decay_shape="1-sqrt")
    np.testing.assert_allclose(jax.jit(schedule)(95), schedule(95), rtol=1e-6)
