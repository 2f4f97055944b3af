"""Models for inference from an `experiments.run` work directory.

A snapshot `<workdir>/checkpoints/<step>/` holds `state` (the TrainState: params, expert_bias,
opt_state, step) and `meta` (the step and the flattened model config, minus the fields that only
change how the model runs). Only `params` and `expert_bias` are read: the optimizer state, twice
the size of the parameters, stays on disk.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from ling_jax.configs.model_config import base_model_config, validate_model_config
from ling_jax.io import paths
from ling_jax.model.params import ExpertBias
from ling_jax.model.transformer import LingForCausalLM
from ling_jax.train.checkpointing import CHECKPOINT_DIR


def config_from_meta(fields: dict[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds a model config from a snapshot's flattened `meta["model"]` fields.

    Fields the snapshot does not name (the runtime ones: dtype, scan_layers, remat,
    moe.backend, ...) keep their defaults; set them on the result.
    """
    cfg = base_model_config()
    for dotted, value in fields.items():
        *sections, name = dotted.split(".")
        node = cfg
        for section in sections:
            if section not in node:
                raise ValueError(f"snapshot meta names an unknown model field {dotted!r}")
            node = node[section]
        if name not in node:
            raise ValueError(f"snapshot meta names an unknown model field {dotted!r}")
        with node.ignore_type():
            node[name] = value
    return cfg


def _manager(workdir: str) -> ocp.CheckpointManager:
    directory = paths.join(paths.resolve(workdir), CHECKPOINT_DIR)
    if not paths.isdir(directory):
        raise ValueError(
            f"{workdir!r} has no {CHECKPOINT_DIR}/ folder: not an experiments.run workdir"
        )
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def snapshot_model_config(
    workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, int]:
    """The model config stored in snapshot `step` (default: the latest) of a run directory."""
    manager = _manager(workdir)
    try:
        step = _resolve_step(manager, workdir, step)
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return config_from_meta(meta["meta"]["model"]), step


def _resolve_step(manager: ocp.CheckpointManager, workdir: str, step: int | None) -> int:
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"{workdir!r} holds no snapshot under {CHECKPOINT_DIR}/")
    elif step not in manager.all_steps():
        raise ValueError(f"{workdir!r} has no snapshot {step}; it has {manager.all_steps()}")
    return step


def load_checkpoint(
    workdir: str,
    *,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    dtype: str | None = None,
) -> tuple[LingForCausalLM, int]:
    """The model of snapshot `step` (default: the latest) of a run directory, and its step.

    `config` replaces the model config stored in the snapshot (its parameter shapes must
    match; `mtp.num_layers = 0` skips the MTP layer); `dtype` sets the compute dtype (the
    parameters keep their stored dtype).
    """
    if config is None:
        config, step = snapshot_model_config(workdir, step)
    config = ml_collections.ConfigDict(config)
    if dtype is not None:
        config.dtype = dtype
    config = validate_model_config(config)
    abstract = nnx.eval_shape(lambda: LingForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, params, expert_bias = nnx.split(abstract, nnx.Param, ExpertBias)
    target = {"params": nnx.as_pure(params), "expert_bias": nnx.as_pure(expert_bias)}
    manager = _manager(workdir)
    try:
        step = _resolve_step(manager, workdir, step)
    except ValueError:
        manager.close()
        raise
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        )["state"]
    except Exception as error:  # orbax raises many types for missing or mismatched trees
        raise ValueError(
            f"snapshot {step} of {workdir!r} does not hold this model's parameters: {error}"
        ) from error
    finally:
        manager.close()
    nnx.replace_by_pure_dict(params, restored["params"])
    nnx.replace_by_pure_dict(expert_bias, restored["expert_bias"])
    return nnx.merge(graphdef, params, expert_bias), int(step)
