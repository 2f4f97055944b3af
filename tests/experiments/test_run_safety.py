"""The training job's safety nets: divergence, a second run on the workdir, a crash and a
corrupt latest snapshot, NaN weights given to merge and generate."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from experiments.configs import smoke
from ling_jax.model.params import ExpertBias
from ling_jax.train.checkpointing import CORRUPT_DIR, _identity_fields
from ling_jax.train.finite import NonFiniteError
from ling_jax.train.merge import merge_target, restore_weights
from ling_jax.train.metrics import METRICS_FILE, read_metrics
from ling_jax.train.trainer import train_and_evaluate
from ling_jax.train.workdir_lock import LOCK_FILE, WorkdirLockedError
from tests.train.conftest import build_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _command(module: str, *args: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(workdir, *overrides) -> subprocess.Popen:
    return _command(
        "experiments.run",
        "--config=experiments/configs/smoke.py",
        f"--workdir={workdir}",
        *overrides,
    )


def _steps(workdir) -> list[int]:
    return [r["step"] for r in read_metrics(str(workdir)) if "train/loss" in r]


def _snapshots(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int)


def test_diverging_run_stops_and_keeps_its_finite_snapshot(tmp_path):
    """lr 1e30 from step 1: step 2's gradient is NaN. Retention keeps one snapshot: saving a
    NaN snapshot at step 2 would have evicted the finite one of step 1."""
    proc = _run(
        tmp_path,
        "--config.optim.peak_lr=1e30",
        "--config.schedule.warmup_steps=0",
        "--config.checkpoint.every_steps=1",
        "--config.checkpoint.max_to_keep=1",
        "--config.train.num_steps=3",
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "error: step 2: non-finite grad_norm = nan; stopping" in err
    assert _snapshots(tmp_path) == ["1"]
    restore_weights(str(tmp_path), 1, merge_target(smoke.get_config()))  # Finite, or it raises.


def test_second_run_on_the_workdir_is_refused_and_the_first_finishes(tmp_path):
    first = _run(tmp_path, "--config.train.num_steps=4", "--config.eval.every_steps=100")
    lock = tmp_path / LOCK_FILE
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.1)
    assert first.poll() is None, first.communicate()[1][-3000:]
    holder = rf"{tmp_path} is in use by another run \(host .*, pid {first.pid}, started "
    with pytest.raises(WorkdirLockedError, match=holder):
        train_and_evaluate(smoke.get_config(), str(tmp_path))
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert _steps(tmp_path) == list(range(1, 5))
    assert _snapshots(tmp_path) == ["2", "4"]


def _garble(directory: str) -> dict[str, bytes]:
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    return _tree_bytes(directory)


def _tree_bytes(directory: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_crash_then_corrupt_latest_snapshot(tmp_path):
    """A run killed after writing step 2's snapshot damaged and half a metrics line: "error"
    names the intact snapshot; "previous" resumes from it, one metrics row per step."""
    workdir = str(tmp_path)
    cfg = smoke.get_config()
    cfg.train.num_steps = 2
    cfg.checkpoint.every_steps = 1
    cfg.eval.every_steps = 100
    train_and_evaluate(cfg, workdir)
    with open(os.path.join(workdir, METRICS_FILE), "a") as f:
        f.write('{"step": 3, "train/lo')
    damaged = _garble(os.path.join(workdir, "checkpoints", "2", "state"))

    cfg.train.num_steps = 3
    intact = r"checkpoints/2 could not be restored.*Intact snapshots: \[1\]"
    with pytest.raises(ValueError, match=intact):
        train_and_evaluate(cfg, workdir)
    assert _snapshots(workdir) == ["1", "2"]

    cfg.checkpoint.on_corrupt = "previous"
    train_and_evaluate(cfg, workdir)
    assert _snapshots(workdir) == ["1", "2", "3"]
    assert _tree_bytes(os.path.join(workdir, CORRUPT_DIR, "2", "state")) == damaged
    assert _steps(workdir) == [1, 2, 3]


@pytest.fixture(scope="module")
def nan_snapshot(tmp_path_factory) -> str:
    """A run directory whose snapshot 5 has a NaN in the token embedding (`embed`)."""
    workdir = str(tmp_path_factory.mktemp("nan_run"))
    cfg = smoke.get_config()
    _, params, expert_bias = nnx.split(build_model(cfg.model), nnx.Param, ExpertBias)
    params = nnx.to_pure_dict(params)
    params["embed"] = np.array(params["embed"])
    params["embed"][3, 1] = np.nan
    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_names=("state", "meta")
    )
    state = {"params": params, "expert_bias": nnx.to_pure_dict(expert_bias)}
    meta = {"step": 5, "model": _identity_fields(cfg.model)}
    manager.save(
        5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    )
    manager.close()
    return workdir


def test_merge_refuses_nan_weights(nan_snapshot):
    bad = r"snapshot .*checkpoints/5 holds NaN/inf weights \(first: `params/embed`"
    with pytest.raises(NonFiniteError, match=bad):
        restore_weights(nan_snapshot, 5, merge_target(smoke.get_config()))


def test_generate_refuses_nan_weights(nan_snapshot):
    proc = _command("experiments.generate", f"--checkpoint={nan_snapshot}", "--prompt=hi")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert f"snapshot 5 of {nan_snapshot} holds NaN/inf weights" in err
    assert "(first: `embed`)" in err
