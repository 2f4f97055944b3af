"""Orbax checkpoints of a training run: train state, data-iterator state and run metadata.

Each snapshot `<workdir>/checkpoints/<step>/` holds three items:
  state  the `TrainState` (params, expert biases, optimizer state, step), as orbax arrays;
  data   the grain iterator state, so a resumed run reads exactly the batches it would have;
  meta   JSON: the model config and the step, checked against the run before restoring.

Saves are asynchronous; the retention policy keeps the last `max_to_keep` snapshots plus every
multiple of `keep_period` (the snapshots WSM merges). A checkpoint that cannot be read, or was
written for another model, stops the run with an error instead of being overwritten.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policies

from ling_jax.io import paths
from ling_jax.train.finite import NonFiniteError, first_nonfinite_leaf

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
ON_CORRUPT = ("error", "previous")
ITEMS = ("state", "data", "meta")

# Model fields that change how the model runs, not what its parameters are.
_RUNTIME_MODEL_FIELDS = (
    "dtype",
    "scan_layers",
    "remat",
    "moe.backend",
    "moe.xla_tile_rows",
    "attention.impl",
    "attention.chunk_size",
    "fp8.enabled",
    "fp8.mode",
    "fp8.power_of_two_scale",
    "fp8.wgrad",
    "fp8.monitor_every_steps",
    "fp8.underflow_warn",
    "fp8.distortion_warn",
)


class IncompatibleCheckpointError(ValueError):
    """A readable snapshot written for another model (not a damaged one)."""


def default_checkpoint_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.every_steps = 100  # Save a snapshot every this many steps (and at the end of the run).
    cfg.max_to_keep = 3  # Most recent snapshots kept; 0 keeps every snapshot.
    cfg.keep_period = 0  # Also keep every step that is a multiple of this (for WSM merging).
    cfg.async_save = True  # Write in a background thread while training continues.
    # A fresh run (no snapshot in its own workdir) starts from the weights (parameters and
    # expert biases, not the optimizer state or data position) of the latest snapshot of this
    # other run directory, e.g. the 4K stage for a 32K context extension. Empty: random init.
    cfg.init_from = ""
    # The latest snapshot cannot be restored (damaged files): "error" stops and names the intact
    # snapshots; "previous" resumes from the newest intact one with a warning. The damaged one
    # is never deleted: it is moved aside to `<workdir>/checkpoints_corrupt/<step>` so that the
    # resumed run can save that step again.
    cfg.on_corrupt = "error"
    return cfg


def validate_checkpoint_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    for field in ("every_steps",):
        if not cfg[field] > 0:
            raise ValueError(f"checkpoint.{field} = {cfg[field]!r} is invalid: expected > 0")
    for field in ("max_to_keep", "keep_period"):
        if cfg[field] < 0:
            raise ValueError(f"checkpoint.{field} = {cfg[field]!r} is invalid: expected >= 0")
    if cfg.on_corrupt not in ON_CORRUPT:
        raise ValueError(
            f"checkpoint.on_corrupt = {cfg.on_corrupt!r}: expected one of {ON_CORRUPT}"
        )
    return cfg


def _identity_fields(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The flattened model config without the runtime-only fields."""
    flat = {}

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, ml_collections.ConfigDict | ml_collections.FrozenConfigDict):
                walk(name + ".", value)
            elif name not in _RUNTIME_MODEL_FIELDS:
                flat[name] = value

    walk("", model_config)
    return flat


class Checkpointer:
    """Saves and restores the snapshots of one run directory."""

    def __init__(self, workdir: str, cfg: ml_collections.ConfigDict, model_config):
        self.directory = paths.join(paths.resolve(workdir), CHECKPOINT_DIR)
        self._on_corrupt = cfg.on_corrupt
        self._model_fields = _identity_fields(model_config)
        options = ocp.CheckpointManagerOptions(
            # Exactly every `every_steps` (orbax would otherwise also save the first step).
            save_decision_policy=save_policies.FixedIntervalPolicy(cfg.every_steps),
            max_to_keep=cfg.max_to_keep or None,
            keep_period=cfg.keep_period or None,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state, data_iterator, *, force: bool = False, extra_meta=None
    ) -> bool:
        """Saves if `step` is due (or `force`); returns whether a save started. `extra_meta`
        adds entries to the meta item (e.g. `merge`: how a WSM-merged snapshot was made).

        Raises NonFiniteError instead of saving a state holding NaN/inf: retention then never
        evicts a finite snapshot in favour of a non-finite one."""
        if not (force or self.manager.should_save(step)):
            return False
        bad = first_nonfinite_leaf(state)
        if bad is not None:
            raise NonFiniteError(
                f"refusing to save snapshot {step} to {self.directory}: `{bad}` holds NaN/inf "
                "(the earlier snapshots are kept)"
            )
        meta = {"step": int(step), "model": self._model_fields, **(extra_meta or {})}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores snapshot `step` into the shapes/shardings of `abstract_state`.

        The data iterator is restored in place. Raises ValueError naming the checkpoint if it
        is unreadable or belongs to a different model.
        """
        path = paths.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as error:  # orbax raises many types for a damaged directory
            raise ValueError(
                f"checkpoint {path} is unreadable (no valid metadata): {error}"
            ) from error
        self._check_compatible(meta["meta"], path)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ),
            )
        except Exception as error:
            raise ValueError(
                f"checkpoint {path} could not be restored into this run's train state "
                f"(corrupt or incompatible; it is left untouched): {error}"
            ) from error
        return restored["state"]

    def restore_latest(self, abstract_state, data_iterator) -> tuple[Any, int] | None:
        """Restores the latest snapshot (None if there is none); returns (state, step).

        If it cannot be restored: with `checkpoint.on_corrupt = "error"` raises ValueError
        naming the intact snapshots; with "previous" moves it aside (never deletes it) and
        restores the newest intact one, with a warning. A snapshot of another model always
        raises (it is not damaged, the config is wrong).
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        try:
            return self.restore(steps[0], abstract_state, data_iterator), steps[0]
        except IncompatibleCheckpointError:
            raise
        except ValueError as error:
            failure = error
        corrupt = [steps[0]]
        for step in steps[1:]:
            if self._on_corrupt == "error":
                break
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except IncompatibleCheckpointError:
                raise
            except ValueError:
                corrupt.append(step)
                continue
            for bad in corrupt:
                self._move_aside(bad)
            logging.warning(
                "Snapshot(s) %s of %s cannot be restored (moved to %s, not deleted); resuming "
                "from the newest intact one, step %d (checkpoint.on_corrupt='previous').",
                corrupt,
                self.directory,
                CORRUPT_DIR,
                step,
            )
            return state, step
        intact = [s for s in steps[1:] if self._is_intact(s, abstract_state)]
        raise ValueError(
            f"{failure}. Intact snapshots: {intact or 'none'}. Set "
            "--config.checkpoint.on_corrupt=previous to resume from the newest intact one (the "
            "damaged snapshot is moved aside, not deleted)."
        ) from failure

    def _is_intact(self, step: int, abstract_state) -> bool:
        """Whether snapshot `step`'s metadata and train state read back (a full read)."""
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            self._check_compatible(meta["meta"], paths.join(self.directory, str(step)))
            self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except Exception:  # orbax raises many types for a damaged directory
            return False
        return True

    def _move_aside(self, step: int) -> None:
        """Moves a damaged snapshot out of the manager's way (kept for inspection)."""
        if jax.process_index() == 0:
            target = epath.Path(self.directory).parent / CORRUPT_DIR
            target.mkdir(parents=True, exist_ok=True)
            (epath.Path(self.directory) / str(step)).rename(target / str(step))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint-corrupt-{step}")
        self.manager.reload()

    def _check_compatible(self, meta: dict, path: str) -> None:
        # Fields classed as runtime-only after the snapshot was written do not count either.
        saved = {k: v for k, v in meta.get("model", {}).items() if k not in _RUNTIME_MODEL_FIELDS}
        current = json.loads(json.dumps(self._model_fields))
        diffs = [
            f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
            for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)
        ]
        if diffs:
            raise IncompatibleCheckpointError(
                f"checkpoint {path} was written for a different model; refusing to resume or "
                "overwrite it. Use another --workdir or fix the config. Differences: "
                + "; ".join(diffs)
            )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state):
    """ShapeDtypeStructs (with shardings) of a concrete state, for restoring into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
