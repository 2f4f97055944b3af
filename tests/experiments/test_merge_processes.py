"""`experiments.merge` on 2 processes (jax.distributed on localhost, CPU collectives).

Each process reads and sums only its shards of the weights (FSDP over the 2 processes' devices)
and writes its shards of the merged snapshot, which equals the 1-process merge.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from experiments.configs import smoke
from ling_jax.parallel.mesh import make_mesh
from ling_jax.train import merge
from tests.experiments.subprocesses import start_module
from tests.experiments.test_run import _free_port
from tests.train.test_wsm_merge import random_state, save_snapshot

STEPS = (10, 20)
FSDP = ("--config.mesh.ici.data=1", "--config.mesh.ici.fsdp=-1")


def fsdp_config():
    cfg = smoke.get_config()
    cfg.mesh.ici.data, cfg.mesh.ici.fsdp = 1, -1
    return cfg


def two_process_snapshots(workdir: str, cfg) -> None:
    """Snapshots 10 and 20 as a 2-process run leaves them: one data-iterator state per process."""
    for step in STEPS:
        save_snapshot(workdir, cfg, step, random_state(cfg, step, seed=step))
        data = os.path.join(workdir, "checkpoints", str(step), "data")
        os.remove(os.path.join(data, "process_0-of-1.json"))
        for i in range(2):
            with open(os.path.join(data, f"process_{i}-of-2.json"), "w") as f:
                json.dump({"step": step, "process": i}, f)


def test_two_processes_merge_their_shards_like_one(tmp_path):
    cfg = fsdp_config()
    workdir, output = str(tmp_path / "run"), str(tmp_path / "merged")
    two_process_snapshots(workdir, cfg)
    port = _free_port()
    procs = [
        start_module(
            "experiments.merge",
            "--config=experiments/configs/smoke.py",
            *FSDP,
            f"--workdir={workdir}",
            f"--output={output}",
            "--last=2",
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]
    outs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]

    # What each process held: its shards of the 2-device FSDP layout, not the whole weights.
    target = merge.merge_target(cfg)
    shardings = merge.merge_shardings(cfg, mesh=make_mesh(cfg.mesh, jax.devices()[:2]))
    total = sum(t.size * t.dtype.itemsize for t in jax.tree.leaves(target))
    shard = sum(
        math.prod(s.shard_shape(t.shape)) * t.dtype.itemsize
        for t, s in zip(jax.tree.leaves(target), jax.tree.leaves(shardings), strict=True)
    )
    assert shard < 0.6 * total
    for i, (out, _) in enumerate(outs):
        held = re.search(r"process (\d) of 2 holds (\d+) of (\d+) bytes", out)
        assert held and held.groups() == (str(i), str(shard), str(total)), out

    # The merged weights equal the 1-process merge (up to the bf16 rounding of a last fp32 bit).
    reference = merge.merge_snapshots(workdir, STEPS, [0.5, 0.5], target, merge.model_fields(cfg))
    written = merge.restore_weights(output, 20, target)
    for got, want in zip(
        jax.tree.leaves(written),
        jax.tree.leaves(merge.cast_like(reference, target)),
        strict=True,
    ):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)
        assert np.mean(got == want) > 0.999
    snapshot = os.path.join(output, "checkpoints", "20")
    for i in range(2):  # each process's data-iterator state of the last merged snapshot
        with open(os.path.join(snapshot, "data", f"process_{i}-of-2.json")) as f:
            assert json.load(f) == {"step": 20, "process": i}
    with open(os.path.join(snapshot, "meta", "metadata")) as f:
        assert json.load(f)["merge"]["steps"] == list(STEPS)
    # The fresh optimizer state: zero moments, the step counts at the merged step.
    _, abstract = merge.abstract_train_state(cfg)
    item = {"opt_state": abstract.opt_state}
    handler = ocp.PyTreeCheckpointHandler()
    opt = handler.restore(
        epath.Path(snapshot) / "state",
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item),
            partial_restore=True,
        ),
    )
    handler.close()
    leaves = jax.tree_util.tree_leaves_with_path(opt)
    counts = [x for p, x in leaves if "count" in str(p[-1])]
    assert counts and all(int(c) == 20 for c in counts)
    assert all(not np.any(x) for p, x in leaves if "count" not in str(p[-1]))
