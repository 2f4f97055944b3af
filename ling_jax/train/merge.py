"""WSM checkpoint merging: select orbax snapshots, average their weights, write the result.

    steps = select_steps(snapshot_steps(workdir), last=8)
    target = merge_target(config)                            # abstract params + expert_bias
    merged = merge_snapshots(workdir, steps, merge_weights(len(steps), "linear"), target,
                             model_fields(config),          # fp32, structure of `target`
                             shardings=merge_shardings(config))  # sharded, or omit: numpy
    write_merged_checkpoint(config, output_workdir, merged, source_workdir=workdir,
                            step=steps[-1], info={...})      # a snapshot experiments.run resumes

Only the model weights are merged: `state.params` and the fp32 router `state.expert_bias`, with
the same weights. Each snapshot's two subtrees are read with an orbax partial restore (the
optimizer state is never read), accumulated in fp32 and released before the next one is read.
With `shardings` (the run's layout on its mesh, `merge_shardings(config)`), each process reads
only its own shards as jax.Arrays and the running sum lives in the same shards on device, so a
host holds its shards of one snapshot plus of the sum, however large the model and however many
snapshots are merged: the multi-host path. Without, the arrays are whole host numpy arrays.
Every selected snapshot is checked first (metadata only): a missing snapshot, a partial one
(an item absent), one written for other model fields, or one whose weight shapes differ is
refused with an error naming it, before any weight is read.

The merged snapshot is a regular one, `<output>/checkpoints/<step>/` at the last merged step:
the merged weights, a fresh optimizer state (created in its sharded layout inside `jit`, never
as a whole host copy; orbax writes each process's shards, process 0 the metadata): zero Adam
moments, its step counts set to the merged step so the learning-rate schedule and the logged
`lr` continue where the run stood, while bias correction damps the first updates as the
moments refill; the data-iterator state
of the last merged snapshot (a resumed run reads the batches that run would have read next) and
`meta["merge"]` recording the source, the steps and the weights.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ling_jax.io import paths
from ling_jax.parallel.mesh import make_mesh
from ling_jax.train import sharded_state
from ling_jax.train.checkpointing import (
    _RUNTIME_MODEL_FIELDS,
    CHECKPOINT_DIR,
    ITEMS,
    Checkpointer,
    _identity_fields,
)
from ling_jax.train.finite import NonFiniteError, first_nonfinite_leaf
from ling_jax.train.hf_init import initialize_weights_from_hf, is_hf_checkpoint
from ling_jax.train.metrics import METRICS_FILE, read_hparams, read_metrics
from ling_jax.train.optimizer import make_optimizer
from ling_jax.train.schedules import make_schedule
from ling_jax.train.train_step import TrainState

# The subtrees of the saved TrainState that a merge reads (never `opt_state`).
WEIGHT_ITEMS = ("params", "expert_bias")
TOKENIZER_DIR = "tokenizer"


# --- Selection ------------------------------------------------------------------------------


def checkpoint_dir(workdir: str) -> str:
    return paths.join(paths.resolve(workdir), CHECKPOINT_DIR)


def snapshot_steps(workdir: str) -> list[int]:
    """Steps of the snapshots in `<workdir>/checkpoints` (orbax's unfinished tmp dirs skipped)."""
    directory = checkpoint_dir(workdir)
    if not paths.isdir(directory):
        raise ValueError(f"{directory} does not exist: no snapshots to merge")
    return sorted(int(name) for name in paths.listdir(directory) if name.isdigit())


def validation_losses(workdir: str) -> dict[int, float]:
    """step -> the `eval/loss` logged at that step in `<workdir>/metrics.jsonl` (the last record
    of a step wins, e.g. after a resumed run re-evaluated it)."""
    if not paths.exists(paths.join(workdir, METRICS_FILE)):
        raise ValueError(f"{paths.join(workdir, METRICS_FILE)} does not exist: no eval/loss")
    return {r["step"]: r["eval/loss"] for r in read_metrics(workdir) if "eval/loss" in r}


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The experiment config run `workdir` last started with, command-line overrides included:
    the latest `hparams` record the trainer writes to `<workdir>/metrics.jsonl` at each start."""
    # Imported here: experiment imports merged_eval, which imports this module.
    from ling_jax.train.experiment import validate_experiment_config

    path = paths.join(workdir, METRICS_FILE)
    try:
        hparams = read_hparams(workdir)
    except FileNotFoundError as error:
        raise ValueError(f"{error}: pass the run's training config (--config)") from error
    if hparams is None:
        raise ValueError(f"{path} records no config (hparams): pass --config")
    return validate_experiment_config(ml_collections.ConfigDict(hparams))


def select_steps(
    available: Sequence[int],
    *,
    last: int = 0,
    top: int = 0,
    steps: Sequence[int] = (),
    min_step: int | None = None,
    max_step: int | None = None,
    every: int = 0,
    losses: Mapping[int, float] | None = None,
) -> list[int]:
    """The snapshot steps to merge, ascending (the order the merge weights refer to).

    steps:   exactly these (each must exist; excludes the other rules).
    Otherwise the candidates are the available steps in [min_step, max_step] that are
    multiples of `every` (0: all), and
    last=N:  the latest N candidates;
    top=N:   the N candidates with the lowest validation loss `losses[step]` (candidates
             without a logged loss are not ranked);
    neither: every candidate.
    Raises ValueError when the rules cannot be met, naming what is there.
    """
    available = sorted(set(available))
    if steps:
        if last or top or min_step is not None or max_step is not None or every:
            raise ValueError("explicit steps exclude last/top/min_step/max_step/every")
        missing = sorted(set(steps) - set(available))
        if missing:
            raise ValueError(f"snapshot(s) {missing} do not exist; available: {available}")
        return sorted(set(steps))
    if last and top:
        raise ValueError(f"choose last={last} or top={top}, not both")
    if last < 0 or top < 0 or every < 0:
        raise ValueError(f"last={last}, top={top}, every={every}: expected >= 0")
    candidates = [
        s
        for s in available
        if (min_step is None or s >= min_step)
        and (max_step is None or s <= max_step)
        and (every == 0 or s % every == 0)
    ]
    rules = f"(min_step={min_step}, max_step={max_step}, every={every})"
    if not candidates:
        raise ValueError(f"no snapshot matches {rules}; available: {available}")
    if last:
        if len(candidates) < last:
            raise ValueError(
                f"last={last} asks for more snapshots than the {len(candidates)} matching "
                f"{rules}: {candidates}"
            )
        return candidates[-last:]
    if top:
        if losses is None:
            raise ValueError("top=N needs the validation losses (metrics.jsonl)")
        ranked = sorted((losses[s], s) for s in candidates if s in losses)
        if len(ranked) < top:
            raise ValueError(
                f"top={top}: only {len(ranked)} of the snapshots {candidates} have an eval/loss "
                f"logged at their step ({[s for _, s in ranked]}); evaluate at every snapshot "
                "(eval.every_steps dividing checkpoint.every_steps) or ask for fewer"
            )
        return sorted(s for _, s in ranked[:top])
    return candidates


# --- Checking and reading snapshots ---------------------------------------------------------


def model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model fields a snapshot's meta records (runtime-only fields excluded), as JSON."""
    return json.loads(json.dumps(_identity_fields(config.model)))


def abstract_train_state(config: ml_collections.ConfigDict):
    """(optimizer, the abstract `TrainState` a run of `config` holds), without allocating."""
    optimizer = make_optimizer(config.optim, make_schedule(config.schedule, config.optim.peak_lr))
    return optimizer, sharded_state.abstract_train_state(config.model, optimizer)


def merge_target(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{"params", "expert_bias"}: the abstract weights (ShapeDtypeStructs) a merge fills."""
    _, state = abstract_train_state(config)
    return {"params": state.params, "expert_bias": state.expert_bias}


def merge_shardings(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> dict[str, Any]:
    """{"params", "expert_bias"}: the NamedShardings a run of `config` lays its weights out in,
    on `mesh` (default: `config.mesh` over all devices of all processes)."""
    optimizer, _ = abstract_train_state(config)
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    _, _, shardings = sharded_state.train_state_shardings(config.model, optimizer, mesh)
    return {"params": shardings.params, "expert_bias": shardings.expert_bias}


def held_bytes(tree: Any) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole arrays) of a tree of arrays: a jax.Array
    counts only its shards on this process's devices, a numpy array all of it."""
    held = total = 0
    for leaf in jax.tree.leaves(tree):
        total += leaf.size * leaf.dtype.itemsize
        if isinstance(leaf, jax.Array):
            held += sum(shard.data.nbytes for shard in leaf.addressable_shards)
        else:
            held += leaf.nbytes
    return held, total


def _key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key(k) for k in path): leaf for path, leaf in leaves}


def check_snapshot(
    workdir: str, step: int, fields: Mapping[str, Any], target: Mapping[str, Any]
) -> dict:
    """Checks snapshot `step` of `workdir` from its metadata alone; returns its meta.

    Raises ValueError naming the snapshot if it is missing, partial (an item absent or
    unreadable), written for other model fields, or holds weights of other shapes or dtypes.
    """
    path = paths.join(checkpoint_dir(workdir), str(step))
    if not paths.isdir(path):
        raise ValueError(f"snapshot {path} does not exist (available: {snapshot_steps(workdir)})")
    absent = [item for item in ITEMS if not paths.isdir(paths.join(path, item))]
    if absent:
        raise ValueError(f"snapshot {path} is partial: it lacks the item(s) {absent}")
    try:
        meta = ocp.JsonCheckpointHandler().restore(epath.Path(path) / "meta")
        stored = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path) / "state").tree
    except Exception as error:  # orbax raises many types for a damaged directory
        raise ValueError(f"snapshot {path} is partial or damaged: {error}") from error
    # Fields classified as runtime-only since the snapshot was written do not count.
    saved_fields = {
        k: v for k, v in meta.get("model", {}).items() if k not in _RUNTIME_MODEL_FIELDS
    }
    diffs = [
        f"model.{k}: snapshot {saved_fields.get(k)!r} vs config {fields.get(k)!r}"
        for k in sorted(set(saved_fields) | set(fields))
        if saved_fields.get(k) != fields.get(k)
    ]
    if diffs:
        raise ValueError(f"snapshot {path} was written for a different model: " + "; ".join(diffs))
    expected = _flat({item: target[item] for item in WEIGHT_ITEMS})
    found = _flat({item: stored.get(item, {}) for item in WEIGHT_ITEMS})
    problems = [f"missing {name}" for name in sorted(set(expected) - set(found))]
    problems += [f"unexpected {name}" for name in sorted(set(found) - set(expected))]
    for name in sorted(set(expected) & set(found)):
        want, have = expected[name], found[name]
        if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
            problems.append(
                f"{name} is {have.dtype}{list(have.shape)}, expected {want.dtype}{list(want.shape)}"
            )
    if problems:
        raise ValueError(
            f"snapshot {path} does not match the model's weights: " + "; ".join(problems)
        )
    return meta


def restore_weights(
    workdir: str, step: int, target: Mapping[str, Any], shardings: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Reads only `state.params` and `state.expert_bias` of a snapshot in the structure of
    `target` (an orbax partial restore: `opt_state` is not read).

    shardings None: whole host numpy arrays in the stored dtypes. Otherwise jax.Arrays laid out
    by `shardings` (same structure) in `target`'s dtypes: each process reads only its shards.
    Raises NonFiniteError if a weight holds NaN/inf (checked on device, nothing gathered).
    """
    path = epath.Path(checkpoint_dir(workdir)) / str(step) / "state"
    item = {name: target[name] for name in WEIGHT_ITEMS}
    if shardings is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    else:
        restore_args = jax.tree.map(
            lambda t, sharding: ocp.ArrayRestoreArgs(
                sharding=sharding, global_shape=t.shape, dtype=t.dtype
            ),
            item,
            {name: shardings[name] for name in WEIGHT_ITEMS},
        )
    handler = ocp.PyTreeCheckpointHandler()
    try:
        weights = handler.restore(
            path,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    except Exception as error:
        raise ValueError(f"snapshot {path.parent} could not be read: {error}") from error
    finally:
        handler.close()
    bad = first_nonfinite_leaf(weights)
    if bad is not None:
        raise NonFiniteError(f"snapshot {path.parent} holds NaN/inf weights (first: `{bad}`)")
    return weights


def merge_snapshots(
    workdir: str,
    steps: Sequence[int],
    weights: Sequence[float] | np.ndarray,
    target: Mapping[str, Any],
    fields: Mapping[str, Any],
    *,
    shardings: Mapping[str, Any] | None = None,
    on_restore: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Σ_j weights[j] · weights of snapshot steps[j], in fp32, with the structure of `target`.

    All snapshots are checked (metadata) before the first is read; then they are read one at a
    time and added into the running fp32 sum: host numpy arrays, or with `shardings` (see
    `merge_shardings`) jax.Arrays in those shardings, summed on device shard by shard.
    on_restore(step, snapshot) sees each snapshot as read (e.g. to report what a host holds).
    """
    weights = np.asarray(weights, np.float64)
    if len(steps) != len(weights) or not steps:
        raise ValueError(f"{len(steps)} snapshots {list(steps)} but {len(weights)} weights")
    for step in steps:
        check_snapshot(workdir, step, fields, target)
    accumulate = _accumulate if shardings is None else _accumulate_on_device
    total = None
    for step, weight in zip(steps, weights, strict=True):
        snapshot = restore_weights(workdir, step, target, shardings)
        if on_restore is not None:
            on_restore(step, snapshot)
        total = accumulate(total, snapshot, np.float32(weight))
        del snapshot  # One snapshot's weights live at a time.
    return total


def _accumulate(total: Any, snapshot: Any, weight: np.float32) -> Any:
    """total + weight * snapshot in fp32, in place (total None: the first term)."""
    if total is None:
        return jax.tree.map(lambda x: weight * np.asarray(x, np.float32), snapshot)
    return jax.tree.map(
        lambda acc, x: np.add(acc, weight * np.asarray(x, np.float32), out=acc), total, snapshot
    )


@jax.jit
def _scaled(snapshot: Any, weight: jax.Array) -> Any:
    return jax.tree.map(lambda x: weight * x.astype(jnp.float32), snapshot)


@functools.partial(jax.jit, donate_argnums=0)
def _add_scaled(total: Any, snapshot: Any, weight: jax.Array) -> Any:
    # Donated: the sum is updated in its own buffers (elementwise, so shardings are kept).
    return jax.tree.map(lambda acc, x: acc + weight * x.astype(jnp.float32), total, snapshot)


def _accumulate_on_device(total: Any, snapshot: Any, weight: np.float32) -> Any:
    """total + weight * snapshot in fp32 on each device's shards (total None: the first term)."""
    return _scaled(snapshot, weight) if total is None else _add_scaled(total, snapshot, weight)


def cast_like(tree: Any, target: Any) -> Any:
    """fp32 merged leaves -> the target's dtypes (e.g. bf16 params; expert biases stay fp32)."""
    return jax.tree.map(lambda x, t: np.asarray(x).astype(t.dtype), tree, target)


# --- Writing --------------------------------------------------------------------------------


class _SavedIteratorState:
    """Stands in for the grain iterator when saving: its state is another snapshot's."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def _reset_counts(opt_state: Any, step: int) -> Any:
    """Sets the optax step counts (Adam's bias correction, the schedule's count) to `step`."""

    def reset(path, leaf):
        return jnp.full_like(leaf, step) if path and _key(path[-1]) == "count" else leaf

    return jax.tree_util.tree_map_with_path(reset, opt_state)


def merged_train_state(
    config: ml_collections.ConfigDict,
    merged: Mapping[str, Any],
    step: int,
    mesh: Mesh | None = None,
) -> TrainState:
    """The TrainState a merged snapshot holds, created in the run's sharded layout on `mesh`
    inside one `jit` (no host copy of the optimizer state): the merged weights in the config's
    dtypes, zero Adam moments, the step and the optax step counts set to `step`."""
    optimizer, abstract = abstract_train_state(config)
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    _, _, shardings = sharded_state.train_state_shardings(config.model, optimizer, mesh)

    def build(params: Any, expert_bias: Any) -> TrainState:
        params = jax.tree.map(lambda x, t: x.astype(t.dtype), params, abstract.params)
        expert_bias = jax.tree.map(
            lambda x, t: x.astype(t.dtype), expert_bias, abstract.expert_bias
        )
        return TrainState(
            step=jnp.asarray(step, jnp.int32),
            params=params,
            expert_bias=expert_bias,
            opt_state=_reset_counts(optimizer.init(params), step),
        )

    return jax.jit(build, out_shardings=shardings)(merged["params"], merged["expert_bias"])


def write_merged_checkpoint(
    config: ml_collections.ConfigDict,
    output_workdir: str,
    merged: Mapping[str, Any],
    *,
    source_workdir: str,
    step: int,
    info: Mapping[str, Any],
    mesh: Mesh | None = None,
) -> str:
    """Writes `merged` as snapshot `step` of `output_workdir`; returns its path.

    `merged`: host numpy arrays or (multi-process) sharded jax.Arrays; the state is laid out on
    `mesh` (default: `config.mesh`), each process writing its shards.

    The data state comes from snapshot `step` of `source_workdir`, the trained tokenizer (if
    any) is copied along, and `meta["merge"] = info`. Refuses an output holding snapshots.
    """
    source_workdir, output_workdir = paths.resolve(source_workdir), paths.resolve(output_workdir)
    if source_workdir == output_workdir:
        raise ValueError(f"--output must differ from the source workdir {source_workdir}")
    source_data = paths.join(checkpoint_dir(source_workdir), str(step), "data")
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not paths.exists(paths.join(source_data, name)):
        raise ValueError(f"snapshot {paths.dirname(source_data)} is partial: no data/{name}")
    data_state = _SavedIteratorState(paths.read_bytes(paths.join(source_data, name)))

    state = merged_train_state(config, merged, step, mesh=mesh)
    cfg = config.checkpoint.copy_and_resolve_references()
    cfg.async_save = False
    checkpointer = Checkpointer(output_workdir, cfg, config.model)
    try:
        existing = checkpointer.manager.all_steps()
        if existing:
            raise ValueError(
                f"{checkpointer.directory} already holds snapshots {sorted(existing)}; "
                "merge into an empty --output"
            )
        checkpointer.save(step, state, data_state, force=True, extra_meta={"merge": dict(info)})
    finally:
        checkpointer.close()
    if jax.process_index() == 0:  # One process copies the files the hosts share.
        output_data = paths.join(checkpointer.directory, str(step), "data")
        for other in paths.listdir(source_data):  # Iterator states of hosts the merge lacks.
            if other.startswith("process_") and not paths.exists(paths.join(output_data, other)):
                paths.copy(paths.join(source_data, other), paths.join(output_data, other))
        tokenizer = paths.join(source_workdir, TOKENIZER_DIR)
        if paths.isdir(tokenizer) and not paths.exists(paths.join(output_workdir, TOKENIZER_DIR)):
            paths.copytree(tokenizer, paths.join(output_workdir, TOKENIZER_DIR))
    if jax.process_count() > 1:  # The others wait for them (e.g. --evaluate reads the tokenizer).
        multihost_utils.sync_global_devices("ling_jax merged snapshot written")
    return paths.join(checkpointer.directory, str(step))


def merged_model_state(merged: Mapping[str, Any], config: ml_collections.ConfigDict) -> nnx.State:
    """The model's full state (params and expert biases) in the config's dtypes, e.g. for
    `ling_jax.convert.hf.save_hf_state`."""
    target = merge_target(config)
    cast = cast_like({k: merged[k] for k in WEIGHT_ITEMS}, target)
    return nnx.merge_state(cast["params"], cast["expert_bias"])


def initialize_weights_from(workdir: str, state: TrainState, shardings: TrainState) -> TrainState:
    """`state` with the params and expert biases of `workdir`'s latest snapshot (laid out by
    `shardings`); the step, the optimizer state and the data position stay fresh.

    Model fields that do not change parameter shapes (RoPE theta and scaling, context length,
    attention implementation, bias rate) may differ, as between context-extension stages.
    A Hugging Face checkpoint folder is read by `ling_jax.train.hf_init` instead.
    """
    if is_hf_checkpoint(workdir):
        return initialize_weights_from_hf(workdir, state, shardings)
    steps = snapshot_steps(workdir)
    if not steps:
        raise ValueError(f"checkpoint.init_from: {checkpoint_dir(workdir)} holds no snapshot")
    target = {
        "params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.params),
        "expert_bias": jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.expert_bias
        ),
    }
    weights = restore_weights(
        workdir,
        steps[-1],
        target,
        {"params": shardings.params, "expert_bias": shardings.expert_bias},
    )  # Each process reads only its shards, in the state's dtypes.
    return state.replace(params=weights["params"], expert_bias=weights["expert_bias"])
