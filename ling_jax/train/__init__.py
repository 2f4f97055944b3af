"""The pure training core: configs, schedules, AdamW, losses, the expert-bias rule, the steps.

from ling_jax import train
optim, schedule_cfg, train_cfg = (train.default_optim_config(),
                                  train.default_schedule_config(),
                                  train.default_train_config())
schedule = train.make_schedule(schedule_cfg, optim.peak_lr)
optimizer = train.make_optimizer(optim, schedule)
graphdef, state = train.init_train_state(model, optimizer)   # consumes the model's arrays
step = train.jit_train_step(
    train.make_train_step(graphdef, optimizer, schedule, train_cfg, optim, model_cfg))
state, metrics = step(state, batch)                           # old `state` is donated
"""

from ling_jax.train.bias_update import update_expert_biases, zero_mean_sign_update
from ling_jax.train.config import (
    default_optim_config,
    default_schedule_config,
    default_train_config,
    validate_optim_config,
    validate_schedule_config,
    validate_train_config,
)
from ling_jax.train.loss import compute_loss
from ling_jax.train.optimizer import make_optimizer, weight_decay_mask
from ling_jax.train.schedules import make_schedule
from ling_jax.train.train_step import (
    TrainState,
    init_train_state,
    jit_train_step,
    make_eval_step,
    make_train_step,
    merge_model,
)

__all__ = [
    "TrainState",
    "compute_loss",
    "default_optim_config",
    "default_schedule_config",
    "default_train_config",
    "init_train_state",
    "jit_train_step",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "merge_model",
    "update_expert_biases",
    "validate_optim_config",
    "validate_schedule_config",
    "validate_train_config",
    "weight_decay_mask",
    "zero_mean_sign_update",
]
