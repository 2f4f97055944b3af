"""Non-finite guards: configs, training steps, snapshots and loaded weights must hold no NaN/inf.

- `nonfinite_config_fields(cfg)`: the dotted names of config numbers that are NaN or inf.
- `first_nonfinite_leaf(tree)`: the path of the first array holding NaN/inf (host or device).
- `NonFiniteGuard`: the trainer's per-step check of the step's `finite` flag, read one step late
  so that it never waits on the step just dispatched (no extra host sync per step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

NONFINITE_MODES = ("stop", "skip")
# The quantities whose finiteness decides a step (the train step's `finite` metric).
CHECKED_METRICS = ("loss", "grad_norm")


class NonFiniteError(RuntimeError):
    """A run produced, or was about to save or load, NaN/inf values."""


def nonfinite_config_fields(cfg: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """(dotted name, value) of the float fields of a (nested) config that are NaN or +-inf."""
    bad = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            bad += nonfinite_config_fields(value, name + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append((name, value))
    return bad


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def first_nonfinite_leaf(tree: Any) -> str | None:
    """The path of the first floating-point leaf of `tree` holding NaN or inf, else None.

    Device arrays are reduced on device in one jitted call (one boolean per leaf comes back),
    so a sharded state is never gathered to the host; eager per-leaf reductions of sharded
    arrays also aborted intermittently on simulated multi-device CPU meshes.
    """
    leaves = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if getattr(leaf, "dtype", None) is not None and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    on_host = [isinstance(leaf, np.ndarray | np.generic) for _, leaf in leaves]
    on_device = [leaf for (_, leaf), host in zip(leaves, on_host, strict=True) if not host]
    device_flags = iter(jax.device_get(_all_finite(on_device)))
    for (path, leaf), host in zip(leaves, on_host, strict=True):
        ok = np.isfinite(leaf).all() if host else next(device_flags)
        if not bool(ok):
            return _path_name(path)
    return None


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.isfinite(leaf).all() for leaf in leaves]


def step_is_finite(metrics: Mapping[str, jax.Array]) -> jax.Array:
    """[] bool inside the train step: every quantity of `CHECKED_METRICS` is finite."""
    return jnp.all(jnp.stack([jnp.isfinite(metrics[name]) for name in CHECKED_METRICS]))


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the step was finite, else `old` (leaf by leaf; for the "skip" mode)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class NonFiniteGuard:
    """Checks each step's `nonfinite` metric on the host, one step late.

    `push(step, metrics)` checks the step pushed before (its result is ready or nearly so,
    since the new step was already dispatched) and keeps this one; `check_now()` checks the
    pending step at once (before a snapshot, and at the end). In "stop" mode the first
    non-finite step raises `NonFiniteError`; in "skip" mode the train step has already left
    the state unchanged, and only `max_skips` consecutive skipped steps raise.
    """

    def __init__(self, mode: str, max_skips: int):
        if mode not in NONFINITE_MODES:
            raise ValueError(f"train.on_nonfinite = {mode!r}: expected one of {NONFINITE_MODES}")
        self.mode = mode
        self.max_skips = max_skips
        self.skipped_in_a_row = 0
        self._pending: tuple[int, Mapping[str, jax.Array]] | None = None

    def push(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        self.check_now()
        self._pending = (step, metrics)

    def check_now(self) -> None:
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        if not float(jax.device_get(metrics["nonfinite"])):
            self.skipped_in_a_row = 0
            return
        values = jax.device_get({name: metrics[name] for name in CHECKED_METRICS})
        bad = ", ".join(f"{k} = {float(v)}" for k, v in values.items() if not np.isfinite(v))
        if self.mode == "stop":
            raise NonFiniteError(
                f"step {step}: non-finite {bad}; stopping (train.on_nonfinite='stop'). No snapshot "
                "of this state was saved; the earlier snapshots are intact. Lower "
                "optim.peak_lr or set train.on_nonfinite='skip' to skip such steps."
            )
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row > self.max_skips:
            raise NonFiniteError(
                f"step {step}: non-finite {bad} for {self.skipped_in_a_row} steps in a row "
                f"(train.max_nonfinite_skips = {self.max_skips}); stopping. No snapshot of a "
                "non-finite state was saved."
            )
        logging.warning(
            "step %d: non-finite %s; the update was skipped (%d in a row, at most %d).",
            step,
            bad,
            self.skipped_in_a_row,
            self.max_skips,
        )
