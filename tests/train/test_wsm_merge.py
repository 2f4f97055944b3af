"""The streaming snapshot merge on hand-made snapshots (no training, nothing compiled).

Snapshots hold random weights of the smoke config's model, saved by the trainer's own
`Checkpointer`, so the merge reads exactly the format a run writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.configs import smoke
from ling_jax.convert.hf import save_hf_state
from ling_jax.train import checkpointing, merge
from ling_jax.train.checkpointing import Checkpointer
from ling_jax.train.finite import NonFiniteError
from ling_jax.train.train_step import TrainState

STEPS = (10, 20, 30)
LOSSES = {10: 3.0, 15: 1.0, 20: 2.5, 30: 2.7}  # step 15 was evaluated but not saved


class FakeIterator:
    """What grain's checkpoint handler needs from an iterator: get_state / set_state."""

    def __init__(self, state: bytes = b"{}"):
        self.state = state

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:
        pass


def random_state(config, step: int, seed: int) -> TrainState:
    _, abstract = merge.abstract_train_state(config)
    rng = np.random.default_rng(seed)

    def fill(leaf):
        return jnp.asarray(rng.standard_normal(leaf.shape).astype(leaf.dtype))

    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=jax.tree.map(fill, abstract.params),
        expert_bias=jax.tree.map(fill, abstract.expert_bias),
        opt_state=jax.tree.map(fill, abstract.opt_state),
    )


def save_snapshot(workdir, config, step, state, meta_model=None) -> None:
    cfg = config.checkpoint.copy_and_resolve_references()
    cfg.async_save = False
    checkpointer = Checkpointer(str(workdir), cfg, meta_model or config.model)
    checkpointer.save(step, state, FakeIterator(f'{{"step": {step}}}'.encode()), force=True)
    checkpointer.close()


@pytest.fixture(scope="module")
def config():
    return smoke.get_config()


@pytest.fixture(scope="module")
def run(config, tmp_path_factory):
    """A run directory with snapshots 10, 20, 30 and eval losses; returns (workdir, states)."""
    workdir = tmp_path_factory.mktemp("run")
    states = {step: random_state(config, step, seed=step) for step in STEPS}
    for step, state in states.items():
        save_snapshot(workdir, config, step, state)
    with open(workdir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"hparams": {}}) + "\n")
        for step, loss in LOSSES.items():
            f.write(json.dumps({"step": step, "eval/loss": loss + 1.0}) + "\n")
            f.write(json.dumps({"step": step, "train/loss": 9.0}) + "\n")
            f.write(json.dumps({"step": step, "eval/loss": loss}) + "\n")  # the last one counts
    return str(workdir), states


@pytest.fixture
def copy_of_run(run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    return str(workdir)


def test_select_steps():
    available = [10, 20, 30, 40, 50, 60]
    assert merge.select_steps(available) == available
    assert merge.select_steps(available, last=3) == [40, 50, 60]
    assert merge.select_steps(available, last=2, max_step=40) == [30, 40]
    assert merge.select_steps(available, min_step=20, max_step=40) == [20, 30, 40]
    assert merge.select_steps(available, every=20) == [20, 40, 60]
    assert merge.select_steps(available, last=2, every=20) == [40, 60]
    assert merge.select_steps([60, 20, 40], steps=[40, 20]) == [20, 40]
    losses = {10: 2.0, 20: 1.5, 30: 1.7, 40: 1.6, 50: 3.0}  # 60 has no eval
    assert merge.select_steps(available, top=3, losses=losses) == [20, 30, 40]
    assert merge.select_steps(available, top=1, min_step=30, losses=losses) == [40]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": [20, 70]}, r"snapshot\(s\) \[70\] do not exist; available: \[10, 20, 30\]"),
        ({"last": 4}, r"last=4 .* 3 matching"),
        ({"min_step": 40}, "no snapshot matches"),
        ({"top": 3, "losses": {10: 1.0, 20: 2.0}}, r"top=3: only 2 .*\[10, 20, 30\]"),
        ({"top": 1}, "validation losses"),
        ({"last": 1, "top": 1}, "not both"),
        ({"steps": [10], "last": 1}, "exclude"),
    ],
)
def test_select_steps_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        merge.select_steps([10, 20, 30], **kwargs)


def test_snapshot_steps_and_losses(run):
    workdir, _ = run
    unfinished = os.path.join(workdir, "checkpoints", "40.orbax-checkpoint-tmp-1")
    os.makedirs(unfinished)
    assert merge.snapshot_steps(workdir) == list(STEPS)
    os.rmdir(unfinished)
    assert merge.validation_losses(workdir) == LOSSES
    top = merge.select_steps(merge.snapshot_steps(workdir), top=2, losses=LOSSES)
    assert top == [20, 30]  # step 15 has the best loss but no snapshot


def test_merge_is_the_weighted_average(run, config):
    workdir, states = run
    weights = np.array([0.2, 0.3, 0.5])
    target = merge.merge_target(config)
    merged = merge.merge_snapshots(workdir, STEPS, weights, target, merge.model_fields(config))
    for item in merge.WEIGHT_ITEMS:
        expected = jax.tree.map(
            lambda a, b, c: (
                0.2 * np.asarray(a, np.float64)
                + 0.3 * np.asarray(b, np.float64)
                + 0.5 * np.asarray(c, np.float64)
            ),
            *(getattr(states[s], item) for s in STEPS),
        )
        assert jax.tree.structure(merged[item]) == jax.tree.structure(target[item])
        for got, want in zip(jax.tree.leaves(merged[item]), jax.tree.leaves(expected), strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_merge_reads_only_the_weights(run, config, monkeypatch):
    """Streaming: one partial restore per snapshot, of params and expert_bias only."""
    workdir, _ = run
    calls = []
    original = ocp.PyTreeCheckpointHandler.restore

    def spy(self, directory, args=None):
        calls.append((str(directory), set(args.item), args.partial_restore))
        return original(self, directory, args=args)

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", spy)
    target = merge.merge_target(config)
    merge.merge_snapshots(workdir, STEPS, [1 / 3] * 3, target, merge.model_fields(config))
    assert [c[0] for c in calls] == [f"{workdir}/checkpoints/{s}/state" for s in STEPS]
    assert all(items == {"params", "expert_bias"} and partial for _, items, partial in calls)


def test_refuses_missing_partial_and_damaged_snapshots(copy_of_run, config):
    workdir = copy_of_run
    target, fields = merge.merge_target(config), merge.model_fields(config)
    with pytest.raises(ValueError, match=r"checkpoints/40 does not exist \(available"):
        merge.merge_snapshots(workdir, [10, 40], [0.5, 0.5], target, fields)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "20", "data"))
    with pytest.raises(
        ValueError, match=r"checkpoints/20 is partial: it lacks the item\(s\) \['data'\]"
    ):
        merge.merge_snapshots(workdir, [10, 20], [0.5, 0.5], target, fields)
    with open(os.path.join(workdir, "checkpoints", "30", "state", "_METADATA"), "w") as f:
        f.write("garbage")
    with pytest.raises(ValueError, match="checkpoints/30 is partial or damaged"):
        merge.merge_snapshots(workdir, [10, 30], [0.5, 0.5], target, fields)


def test_refuses_snapshots_of_another_model(copy_of_run, config):
    workdir = copy_of_run
    other = config.copy_and_resolve_references()
    other.model.init_std = 0.5  # same shapes, other model fields
    save_snapshot(workdir, other, 40, random_state(other, 40, seed=4), meta_model=other.model)
    target, fields = merge.merge_target(config), merge.model_fields(config)
    with pytest.raises(ValueError, match=r"checkpoints/40 was written for a different .*init_std"):
        merge.merge_snapshots(workdir, [30, 40], [0.5, 0.5], target, fields)
    wider = config.copy_and_resolve_references()
    wider.model.moe.num_experts = 8
    # Weights of another shape under this model's meta: caught by the shape check.
    save_snapshot(workdir, config, 50, random_state(wider, 50, seed=5))
    with pytest.raises(ValueError, match=r"checkpoints/50 does not match .*expert_bias is float32"):
        merge.merge_snapshots(workdir, [30, 50], [0.5, 0.5], target, fields)


def test_merged_checkpoint_restores_as_a_train_state(run, config, tmp_path):
    workdir, states = run
    target = merge.merge_target(config)
    fields = merge.model_fields(config)
    merged = merge.merge_snapshots(workdir, STEPS, [0.25, 0.25, 0.5], target, fields)
    os.makedirs(os.path.join(workdir, "tokenizer"), exist_ok=True)
    output = str(tmp_path / "merged")
    info = {"source": workdir, "steps": list(STEPS), "weights": [0.25, 0.25, 0.5]}
    path = merge.write_merged_checkpoint(
        config, output, merged, source_workdir=workdir, step=30, info=info
    )
    assert path == os.path.join(output, "checkpoints", "30")
    assert os.path.isdir(os.path.join(output, "tokenizer"))
    # What the trainer does on resume: restore the whole TrainState into its abstract shape.
    _, abstract = merge.abstract_train_state(config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract
    )
    iterator = FakeIterator()
    checkpointer = Checkpointer(output, config.checkpoint, config.model)
    restored = checkpointer.restore(30, abstract, iterator)
    checkpointer.close()
    assert iterator.state == b'{"step": 30}'  # the data state of the last merged snapshot
    assert int(restored.step) == 30
    for got, want in zip(
        jax.tree.leaves(restored.params), jax.tree.leaves(merged["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)
    opt_leaves = jax.tree_util.tree_leaves_with_path(restored.opt_state)
    counts = [x for p, x in opt_leaves if "count" in str(p[-1])]
    assert counts and all(int(c) == 30 for c in counts)  # the schedule continues at step 30
    assert all(not np.any(np.asarray(x)) for p, x in opt_leaves if "count" not in str(p[-1]))
    with open(os.path.join(path, "meta", "metadata")) as f:
        meta = json.load(f)
    assert meta["merge"] == info and meta["step"] == 30
    with pytest.raises(ValueError, match="already holds snapshots"):
        merge.write_merged_checkpoint(
            config, output, merged, source_workdir=workdir, step=30, info={}
        )
    # HF export of the merged weights: expert biases stay fp32.
    hf_dir = tmp_path / "hf"
    save_hf_state(merge.merged_model_state(merged, config), config.model, hf_dir)
    assert (hf_dir / "config.json").exists() and (hf_dir / "model.safetensors.index.json").exists()


def test_peak_memory_does_not_grow_with_the_number_of_snapshots(run, config, monkeypatch):
    """Host memory: the running sum plus one snapshot, whether 1 or 6 snapshots are merged."""
    workdir, _ = run
    target, fields = merge.merge_target(config), merge.model_fields(config)
    weight_bytes = sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(target))
    # Only the reading and summing is measured: orbax's metadata reads (the checks) keep a few
    # small per-leaf objects alive per call, independent of the weights' size.
    monkeypatch.setattr(merge, "check_snapshot", lambda *args: None)

    def peak(steps) -> int:
        tracemalloc.start()
        merge.merge_snapshots(workdir, steps, [1 / len(steps)] * len(steps), target, fields)
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return peak_bytes

    peak([10])  # warm orbax's caches
    one, six = peak([10]), peak([10, 20, 30, 10, 20, 30])
    # Holding all six would cost 6x the weights; the sum plus one snapshot is 2x at most.
    assert six < 2.5 * weight_bytes, (six, weight_bytes)
    assert six - one < weight_bytes, (six, one, weight_bytes)  # not one more snapshot


def test_fields_now_runtime_only_do_not_count(copy_of_run, config):
    """A snapshot recording fields since classified as runtime-only (they do not change the
    weights) still merges."""
    workdir = copy_of_run
    meta_file = os.path.join(workdir, "checkpoints", "30", "meta", "metadata")
    with open(meta_file) as f:
        meta = json.load(f)
    meta["model"].update({"attention.impl": "xla", "dtype": "bfloat16"})
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    merge.check_snapshot(workdir, 30, merge.model_fields(config), merge.merge_target(config))


def fsdp(config):
    """`config` on an FSDP mesh over the 8 simulated devices: the weights are split 8 ways."""
    cfg = config.copy_and_resolve_references()
    cfg.mesh.ici.data, cfg.mesh.ici.fsdp = 1, -1
    return cfg


def assert_laid_out(tree, shardings) -> None:
    """Every leaf is a jax.Array in its sharding, each device holding only its shard."""
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        assert isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
        for shard in leaf.addressable_shards:
            assert shard.data.shape == sharding.shard_shape(leaf.shape)


def test_sharded_merge_equals_the_numpy_merge(run, config, tmp_path):
    """On an FSDP mesh each snapshot is read as sharded arrays and summed shard by shard; the
    result, and the merged snapshot written from it, equal the host numpy merge."""
    workdir, _ = run
    cfg = fsdp(config)
    target, fields = merge.merge_target(cfg), merge.model_fields(cfg)
    weights = [0.2, 0.3, 0.5]
    shardings = merge.merge_shardings(cfg)
    split = [
        s.shard_shape(t.shape) != t.shape
        for t, s in zip(jax.tree.leaves(target), jax.tree.leaves(shardings), strict=True)
    ]
    assert sum(split) > len(split) // 2  # most weights are really split over the mesh
    seen = []

    def check(step, snapshot):
        assert_laid_out(snapshot, shardings)
        seen.append(step)

    sharded = merge.merge_snapshots(
        workdir, STEPS, weights, target, fields, shardings=shardings, on_restore=check
    )
    reference = merge.merge_snapshots(workdir, STEPS, weights, target, fields)
    assert seen == list(STEPS)
    assert_laid_out(sharded, shardings)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference), strict=True):
        assert got.dtype == jnp.float32
        # Equal up to fp32 rounding (XLA may fuse the multiply-add).
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)

    output = str(tmp_path / "merged")
    merge.write_merged_checkpoint(cfg, output, sharded, source_workdir=workdir, step=30, info={})
    written = merge.restore_weights(output, 30, target)
    for got, want in zip(
        jax.tree.leaves(written), jax.tree.leaves(merge.cast_like(sharded, target)), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_sharded_merge_refuses_nonfinite_weights(copy_of_run, config, monkeypatch):
    workdir, cfg = copy_of_run, fsdp(config)
    # A snapshot damaged on disk (the trainer itself refuses to save NaN/inf).
    monkeypatch.setattr(checkpointing, "first_nonfinite_leaf", lambda tree: None)
    state = random_state(cfg, 40, seed=4)
    leaves, treedef = jax.tree.flatten(state.params)
    leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(jnp.nan)
    save_snapshot(workdir, cfg, 40, state.replace(params=jax.tree.unflatten(treedef, leaves)))
    target, fields = merge.merge_target(cfg), merge.model_fields(cfg)
    with pytest.raises(NonFiniteError, match=r"checkpoints/40 holds NaN/inf weights"):
        merge.merge_snapshots(
            workdir, [30, 40], [0.5, 0.5], target, fields, shardings=merge.merge_shardings(cfg)
        )
