"""Learning-rate schedules: WSM (Ling 2.0's default), cosine and WSD.

All three share a linear warmup, lr(t) = peak * t / warmup_steps for t < warmup_steps
(SPEC section 8), then:

  wsm     peak forever; annealing comes from merging checkpoints afterwards (SPEC section 8).
  cosine  final + (peak - final) * (1 + cos(pi * x)) / 2,   x = (t - warmup) / (total - warmup).
  wsd     peak until the last `decay_steps` steps, then, with x the fraction of the decay done:
          linear       peak - (peak - final) * x
          1-sqrt       final + (peak - final) * (1 - sqrt(x))
          exponential  peak * (final / peak) ** x

where final = final_lr_fraction * peak, and cosine and wsd stay at `final` after total_steps.
Schedules are jit-able functions of the (integer) optimizer step, as optax expects.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

from ling_jax.train.config import decay_steps, validate_schedule_config


def _warmup(step: jnp.ndarray, warmup_steps: int, peak_lr: float) -> jnp.ndarray:
    if warmup_steps == 0:
        return jnp.full_like(step, peak_lr)
    return peak_lr * jnp.minimum(step / warmup_steps, 1.0)


def make_schedule(schedule_cfg: ml_collections.ConfigDict, peak_lr: float) -> optax.Schedule:
    """Returns lr(step) for the `schedule` config section, peaking at `peak_lr`."""
    cfg = validate_schedule_config(schedule_cfg)
    kind, warmup, total = cfg.type, int(cfg.warmup_steps), int(cfg.total_steps)
    final_lr = cfg.final_lr_fraction * peak_lr

    def wsm(count):
        return _warmup(jnp.asarray(count, jnp.float32), warmup, peak_lr)

    def cosine(count):
        step = jnp.asarray(count, jnp.float32)
        x = jnp.clip((step - warmup) / (total - warmup), 0.0, 1.0)
        decayed = final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * x))
        return jnp.where(step < warmup, _warmup(step, warmup, peak_lr), decayed)

    num_decay = decay_steps(cfg)
    decay_start = total - num_decay
    shape = cfg.decay_shape

    def wsd(count):
        step = jnp.asarray(count, jnp.float32)
        x = jnp.clip((step - decay_start) / num_decay, 0.0, 1.0)
        if shape == "linear":
            decayed = peak_lr - (peak_lr - final_lr) * x
        elif shape == "1-sqrt":
            decayed = final_lr + (peak_lr - final_lr) * (1.0 - jnp.sqrt(x))
        else:  # "exponential"
            decayed = peak_lr * (final_lr / peak_lr) ** x
        return jnp.where(step < warmup, _warmup(step, warmup, peak_lr), decayed)

    return {"wsm": wsm, "cosine": cosine, "wsd": wsd}[kind]
