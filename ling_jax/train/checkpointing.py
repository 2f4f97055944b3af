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
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policies

from ling_jax.io import paths

CHECKPOINT_DIR = "checkpoints"
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
    return cfg


def validate_checkpoint_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    for field in ("every_steps",):
        if not cfg[field] > 0:
            raise ValueError(f"checkpoint.{field} = {cfg[field]!r} is invalid: expected > 0")
    for field in ("max_to_keep", "keep_period"):
        if cfg[field] < 0:
            raise ValueError(f"checkpoint.{field} = {cfg[field]!r} is invalid: expected >= 0")
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
        adds entries to the meta item (e.g. `merge`: how a WSM-merged snapshot was made)."""
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
            raise ValueError(
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
