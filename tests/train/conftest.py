"""Shared fixtures for the training core: one tiny model, one jitted step (compile time dominates).

Batches follow the data pipeline's layout (`ling_jax.data.packing`): each document is shifted
on its own before packing, so a target always belongs to its input's document, segment ids
number the documents of a row from 1 (0 = padding), positions restart per document, and
loss_mask is 0 on padding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ling_jax.configs import get_preset
from ling_jax.model import LingForCausalLM
from ling_jax.train import config as train_config
from ling_jax.train.optimizer import make_optimizer
from ling_jax.train.schedules import make_schedule
from ling_jax.train.train_step import (
    init_train_state,
    jit_train_step,
    make_eval_step,
    make_train_step,
)

SEQ = 16
BATCH = 4
# Documents per row as lengths; the remainder of the row is padding.
ROW_LAYOUTS = ((16,), (5, 7), (3, 4, 6), (9,))
# Skips LLVM's optimisations: the tiny steps compile ~5x faster and still run in milliseconds.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def packed_batch(seed: int = 0, vocab: int = 256) -> dict[str, np.ndarray]:
    """A [BATCH, SEQ] batch of packed documents with padding, as the data pipeline yields."""
    rng = np.random.default_rng(seed)
    rows = {key: [] for key in ("input_ids", "targets", "segment_ids", "positions", "loss_mask")}
    for lengths in ROW_LAYOUTS:
        input_ids, targets, segments, positions = [], [], [], []
        for segment, length in enumerate(lengths, start=1):
            tokens = rng.integers(1, vocab, size=length + 1)
            input_ids += list(tokens[:-1])
            targets += list(tokens[1:])
            segments += [segment] * length
            positions += list(range(length))
        pad = SEQ - len(input_ids)
        rows["input_ids"].append(input_ids + [0] * pad)
        rows["targets"].append(targets + [0] * pad)
        rows["segment_ids"].append(segments + [0] * pad)
        rows["positions"].append(positions + [0] * pad)
        rows["loss_mask"].append([1.0] * (SEQ - pad) + [0.0] * pad)
    dtypes = {"loss_mask": np.float32}
    return {key: np.asarray(value, dtypes.get(key, np.int32)) for key, value in rows.items()}


@dataclasses.dataclass
class TrainSetup:
    model_cfg: object
    optim_cfg: object
    schedule_cfg: object
    train_cfg: object
    schedule: object
    optimizer: object
    graphdef: object
    initial_state: object  # Never passed to a donating step: use fresh_state().

    def fresh_state(self):
        return jax.tree.map(jnp.copy, self.initial_state)

    def jitted_step(self, micro_batches: int):
        cfg = self.train_cfg.copy_and_resolve_references()
        cfg.micro_batches = micro_batches
        step = make_train_step(
            self.graphdef, self.optimizer, self.schedule, cfg, self.optim_cfg, self.model_cfg
        )
        return jit_train_step(step, compiler_options=FAST_COMPILE)


def build_model(cfg, seed: int = 0) -> LingForCausalLM:
    """The model with N(0, init_std^2) matrices, unit norm scales and zero expert biases.

    Filled from numpy on the abstract (`nnx.eval_shape`) model: eager initialisation compiles
    one XLA program per parameter shape, which costs tens of seconds on a busy CPU.
    """
    abstract = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            value = np.ones(leaf.shape)
        elif "expert_bias" in name:
            value = np.zeros(leaf.shape)
        else:
            value = cfg.init_std * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def tiny_model_config():
    cfg = get_preset("tiny")
    # The reference grouped matmul: independent of the "xla" backend's tiling.
    cfg.moe.backend = "ragged_dot"
    return cfg


@pytest.fixture(scope="session")
def tiny_train() -> TrainSetup:
    model_cfg = tiny_model_config()
    optim_cfg = train_config.default_optim_config()
    optim_cfg.peak_lr = 1e-2
    optim_cfg.z_loss_weight = 1e-3
    schedule_cfg = train_config.default_schedule_config()
    schedule_cfg.warmup_steps = 0
    train_cfg = train_config.default_train_config()
    train_cfg.batch_size = BATCH
    train_cfg.micro_batches = 2
    schedule = make_schedule(schedule_cfg, optim_cfg.peak_lr)
    optimizer = make_optimizer(optim_cfg, schedule)
    model = build_model(model_cfg)
    graphdef, state = init_train_state(model, optimizer)
    return TrainSetup(
        model_cfg, optim_cfg, schedule_cfg, train_cfg, schedule, optimizer, graphdef, state
    )


@pytest.fixture(scope="session")
def tiny_train_step(tiny_train):
    """The shared jitted step: two micro-batches, z-loss on, state donated."""
    return tiny_train.jitted_step(tiny_train.train_cfg.micro_batches)


@pytest.fixture(scope="session")
def tiny_eval_step(tiny_train):
    return jax.jit(make_eval_step(tiny_train.graphdef), compiler_options=FAST_COMPILE)
