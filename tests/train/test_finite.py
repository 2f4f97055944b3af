"""Non-finite guards: config validation, the skipping train step, the host-side check, saves."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import smoke
from ling_jax.train.checkpointing import Checkpointer
from ling_jax.train.experiment import validate_experiment_config
from ling_jax.train.finite import NonFiniteError, NonFiniteGuard, first_nonfinite_leaf
from tests.train.conftest import packed_batch


@pytest.mark.parametrize(
    "section, field, value",
    [
        ("optim", "peak_lr", math.inf),
        ("optim", "b2", math.nan),
        ("schedule", "decay_fraction", -math.inf),
    ],
)
def test_config_rejects_nonfinite_numbers_naming_the_field(section, field, value):
    cfg = smoke.get_config()
    cfg[section][field] = value
    with pytest.raises(ValueError, match=rf"`{section}\.{field}` = .* not finite"):
        validate_experiment_config(cfg)


def test_first_nonfinite_leaf_names_the_parameter():
    tree = {"a": {"w": np.ones(3, np.float32)}, "b": {"w": jnp.array([1.0, jnp.inf])}}
    assert first_nonfinite_leaf(tree) == "b/w"
    tree["b"]["w"] = jnp.ones(2)
    assert first_nonfinite_leaf(tree) is None


def _metrics(loss, grad_norm=1.0):
    finite = np.isfinite(loss) and np.isfinite(grad_norm)
    return {"loss": np.float32(loss), "grad_norm": np.float32(grad_norm), "nonfinite": 1.0 - finite}


def test_guard_stops_one_step_late_naming_step_and_quantity():
    guard = NonFiniteGuard("stop", max_skips=3)
    guard.push(1, _metrics(2.0))
    guard.push(2, _metrics(np.nan))  # Checks step 1 only: no wait on the step just dispatched.
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss = nan"):
        guard.push(3, _metrics(2.0))


def test_guard_skips_then_stops_after_too_many_in_a_row():
    guard = NonFiniteGuard("skip", max_skips=2)
    for step in (1, 2):
        guard.push(step, _metrics(1.0, np.inf))
    guard.push(3, _metrics(1.0))  # A finite step resets the count.
    guard.push(4, _metrics(1.0, np.inf))
    guard.push(5, _metrics(1.0, np.inf))
    guard.push(6, _metrics(np.nan))
    with pytest.raises(NonFiniteError, match=r"step 6: non-finite loss = nan for 3 steps in a row"):
        guard.check_now()


def test_skip_step_leaves_params_optimizer_and_bias_unchanged(tiny_train):
    cfg = tiny_train.train_cfg.copy_and_resolve_references()
    cfg.on_nonfinite = "skip"
    from ling_jax.train.train_step import jit_train_step, make_train_step
    from tests.train.conftest import FAST_COMPILE

    step = jit_train_step(
        make_train_step(
            tiny_train.graphdef,
            tiny_train.optimizer,
            tiny_train.schedule,
            cfg,
            tiny_train.optim_cfg,
            tiny_train.model_cfg,
        ),
        compiler_options=FAST_COMPILE,
    )
    batch = packed_batch()
    finite_state, metrics = step(tiny_train.fresh_state(), batch)
    assert float(metrics["nonfinite"]) == 0.0
    assert first_nonfinite_leaf(finite_state) is None

    leaves, treedef = jax.tree.flatten(finite_state.params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    poisoned = finite_state.replace(params=jax.tree.unflatten(treedef, leaves))
    before = jax.tree.map(np.asarray, poisoned)
    after, metrics = step(poisoned, batch)
    assert float(metrics["nonfinite"]) == 1.0
    assert int(after.step) == int(before.step) + 1
    for name in ("params", "opt_state", "expert_bias"):
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
            getattr(after, name),
            getattr(before, name),
        )


def test_checkpointer_refuses_a_nonfinite_state(tmp_path):
    cfg = smoke.get_config()
    checkpointer = Checkpointer(str(tmp_path), cfg.checkpoint, cfg.model)
    state = {"params": {"w": jnp.array([1.0, jnp.nan])}, "step": jnp.int32(4)}
    with pytest.raises(NonFiniteError, match=r"refusing to save snapshot 4 .*`params/w`"):
        checkpointer.save(4, state, None, force=True)
    checkpointer.close()
    assert checkpointer.latest_step() is None
