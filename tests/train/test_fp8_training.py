"""FP8 training end to end on the tiny model: the step trains and tracks the high-precision
step, the safeguard monitor writes and warns, and `--config.fp8.*` reaches the model."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from absl import flags, logging
from ml_collections import config_flags

from experiments.configs import fp8_compare, quickstart, smoke
from ling_jax.train.experiment import validate_experiment_config
from ling_jax.train.fp8_monitor import Fp8Monitor, crossings
from ling_jax.train.metrics import read_metrics
from ling_jax.train.train_step import init_train_state, jit_train_step, make_train_step
from ling_jax.train.trainer import train_and_evaluate
from tests.train.conftest import FAST_COMPILE, build_model, packed_batch, tiny_model_config


def losses(setup, model_cfg, steps=4):
    graphdef, state = init_train_state(build_model(model_cfg), setup.optimizer)
    step = jit_train_step(
        make_train_step(
            graphdef, setup.optimizer, setup.schedule, setup.train_cfg, setup.optim_cfg, model_cfg
        ),
        compiler_options=FAST_COMPILE,
    )
    batch = packed_batch()
    out = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        out.append(float(metrics["loss"]))
    return graphdef, state, out


@pytest.fixture(scope="module")
def fp8_model_cfg():
    cfg = tiny_model_config()
    cfg.moe.backend = "xla"
    cfg.fp8.enabled = True
    cfg.fp8.mode = "emulated"
    return cfg


@pytest.fixture(scope="module")
def fp8_run(tiny_train, fp8_model_cfg):
    return losses(tiny_train, fp8_model_cfg)


def test_fp8_step_trains_and_tracks_the_high_precision_step(tiny_train, fp8_run):
    _, _, fp8_losses = fp8_run
    _, _, base = losses(tiny_train, tiny_model_config())
    assert fp8_losses[-1] < fp8_losses[0] - 0.5, fp8_losses
    # Same start; on one batch repeated at lr 1e-2 the tiny model (hidden 64: one partial
    # tile per row) overfits fast and the paths drift apart by a few percent in four steps.
    np.testing.assert_allclose(fp8_losses[:2], base[:2], rtol=1e-3)
    np.testing.assert_allclose(fp8_losses, base, rtol=5e-2)


def test_monitor_writes_every_op_and_warns(fp8_run, fp8_model_cfg, monkeypatch):
    graphdef, state, _ = fp8_run
    cfg = fp8_model_cfg.copy_and_resolve_references()
    cfg.fp8.monitor_every_steps = 5
    cfg.fp8.distortion_warn = 1.0  # Every round trip loses something: every op warns.
    monitor = Fp8Monitor(graphdef, cfg, micro_batches=2)
    assert monitor(4, state, packed_batch()) == {}
    warned = []
    monkeypatch.setattr(logging, "warning", lambda fmt, *args: warned.append(fmt % args))
    metrics = monitor(5, state, packed_batch())
    names = [k for k in metrics if k.count("/") == 4]
    assert len(names) == 2 * 3 * (5 + 7 * 3)  # stats x tensors x ops (dense, 2 MoE, MTP)
    assert "fp8/distortion/mtp/attn_qkv/grad" in metrics
    assert "fp8/underflow/layer_02/experts_down/input" in metrics
    assert 0.99 < metrics["fp8/distortion/min"] < 1 and metrics["fp8/underflow/max"] < 0.01
    distorted = [line for line in warned if "fp8.distortion_warn" in line]
    assert len(distorted) == len(names) // 2  # Underflows above 1e-3 (gradients) may add more.
    assert all(line.startswith("FP8 safeguard at step 5: fp8/") for line in warned)
    loose = fp8_model_cfg.fp8.copy_and_resolve_references()
    loose.underflow_warn, loose.distortion_warn = 0.01, 0.99
    assert crossings(metrics, loose) == []
    disabled = Fp8Monitor(graphdef, tiny_model_config())
    assert not disabled.due(100)


def test_fp8_flag_reaches_the_model_config():
    argv = ["run", "--config=experiments/configs/quickstart.py", "--config.fp8.enabled=True"]
    argv.append("--config.model.fp8.mode=emulated")  # The same section under its other name.
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    cfg = holder.value
    assert cfg.fp8 is cfg.model.fp8
    assert cfg.model.fp8.enabled and cfg.fp8.mode == "emulated"
    validate_experiment_config(cfg)
    cfg.fp8 = cfg.fp8.copy_and_resolve_references()
    cfg.fp8.mode = "native"
    with pytest.raises(ValueError, match="model.fp8"):
        validate_experiment_config(cfg)


@pytest.mark.parametrize("precision", (*fp8_compare.PRECISIONS, fp8_compare.CONTROL))
def test_fp8_compare_configs(precision):
    cfg = validate_experiment_config(fp8_compare.get_config(f"{precision},50"))
    assert cfg.model.fp8.enabled == (precision == "fp8") and cfg.train.num_steps == 50
    assert cfg.model.hidden_size % 128 == 0 and cfg.model.moe.expert_intermediate_size % 128 == 0
    assert cfg.model.dtype == "bfloat16" and cfg.seed == quickstart.get_config().seed
    with pytest.raises(ValueError, match="precision"):
        fp8_compare.get_config("fp16")
    seeded = fp8_compare.get_config(f"{precision},50,3")
    assert seeded.seed == 3 and seeded.data.shuffle_seed == 3
    jax.tree.map(lambda x: x, cfg.to_dict())


def test_trainer_writes_the_safeguards_and_snapshots_resume_across_fp8(tmp_path):
    """An FP8 run logs fp8/* every monitor_every_steps; fp8 fields are runtime-only, so the
    same workdir resumes with FP8 off."""
    cfg = smoke.get_config()
    cfg.train.num_steps = 2
    cfg.fp8.enabled = True
    cfg.fp8.monitor_every_steps = 2
    workdir = str(tmp_path)
    train_and_evaluate(cfg, workdir)
    probes = [r for r in read_metrics(workdir) if "fp8/underflow/max" in r]
    assert [r["step"] for r in probes] == [2]
    assert "fp8/distortion/layer_01/experts_gate_up/grad" in probes[0]
    cfg = smoke.get_config()
    cfg.train.num_steps = 3
    train_and_evaluate(cfg, workdir)
    assert max(r["step"] for r in read_metrics(workdir)) == 3
