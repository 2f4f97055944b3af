"""WSM end to end on the smoke config: periodic merged eval, `experiments.merge`, resume."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
from absl import app, flags

from experiments.configs import smoke, wsm_compare
from ling_jax.train import merge
from ling_jax.train.experiment import validate_experiment_config
from ling_jax.train.metrics import read_metrics
from ling_jax.train.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def smoke_config(num_steps: int = 4):
    cfg = smoke.get_config()
    cfg.train.num_steps = num_steps
    cfg.eval.merged_every_steps = 2
    cfg.eval.merged_num_snapshots = 2
    return cfg


def records(workdir, key):
    return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """Smoke run of 4 steps: snapshots 2 and 4, merged eval at step 4 (2 snapshots)."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    train_and_evaluate(smoke_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    """`python -m experiments.merge --last=2 --evaluate --hf_output=...` on the smoke run
    (in this process: the flags are parsed as the command line would be)."""
    from experiments import merge as merge_command  # defines absl flags: import here only

    root = tmp_path_factory.mktemp("merged")
    output, hf_dir = str(root / "run"), str(root / "hf")
    argv = [
        "merge",
        f"--config={os.path.join(REPO, 'experiments', 'configs', 'smoke.py')}",
        f"--workdir={trained}",
        f"--output={output}",
        "--last=2",
        "--evaluate",
        f"--hf_output={hf_dir}",
    ]
    flags.FLAGS(argv)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        merge_command.main(argv[:1])
    return output, hf_dir, stdout.getvalue()


def test_merge_command_writes_an_evaluated_snapshot(trained, merged):
    output, hf_dir, stdout = merged
    assert "merging 2 snapshots" in stdout and "eval/loss=" in stdout
    assert sorted(os.listdir(os.path.join(output, "checkpoints"))) == ["4"]
    with open(os.path.join(output, "checkpoints", "4", "meta", "metadata")) as f:
        meta = json.load(f)
    assert meta["merge"]["steps"] == [2, 4] and meta["merge"]["weights"] == [0.5, 0.5]
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
    assert os.path.exists(os.path.join(hf_dir, "tokenizer.json"))  # The run's trained BPE.
    # The eval-only run of the merged snapshot equals the merged eval the training logged.
    merged_loss = records(output, "eval/loss")[4]
    np.testing.assert_allclose(merged_loss, records(trained, "eval/merged_loss")[4], rtol=1e-5)
    assert merged_loss != records(trained, "eval/loss")[4]


def test_merge_reads_the_run_config_from_its_metrics(trained, tmp_path, capsys):
    """Without --config, merge uses the config the run recorded (overrides included)."""
    from experiments import merge as merge_command  # defines absl flags: import here only

    want = validate_experiment_config(smoke_config()).to_dict()
    assert merge.run_config(trained).to_dict() == want
    flags.FLAGS.unparse_flags()  # Forget the merged fixture's flags, --config included.
    argv = ["merge", f"--workdir={trained}", f"--output={tmp_path / 'run'}", "--steps=4"]
    flags.FLAGS(argv)
    merge_command.main(argv[:1])
    assert "config: the run's, recorded in" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4"]
    with pytest.raises(ValueError, match="pass the run's training config"):
        merge.run_config(str(tmp_path / "elsewhere"))


def test_merged_snapshot_resumes_training(merged):
    output, _, _ = merged
    final = train_and_evaluate(smoke_config(num_steps=6), output)
    losses = records(output, "train/loss")
    assert sorted(losses) == [5, 6] and all(np.isfinite(list(losses.values())))
    assert np.isfinite(final["eval/loss"])
    assert sorted(os.listdir(os.path.join(output, "checkpoints"))) == ["4", "6"]


def test_periodic_merged_eval_waits_for_enough_snapshots(trained):
    assert sorted(records(trained, "eval/merged_loss")) == [4]  # step 2 had one snapshot


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"eval.merged_every_steps": 3}, r"merged_every_steps = 3: expected a multiple"),
        ({"eval.merged_spacing": 3}, r"merged_spacing = 3: expected a multiple"),
        ({"eval.merged_decay_shape": "exp"}, "unknown WSM decay shape"),
        ({"checkpoint.max_to_keep": 1}, r"max_to_keep = 1 drops snapshots"),
    ],
)
def test_merged_eval_config_is_validated(overrides, match):
    cfg = smoke_config()
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        cfg[section][field] = value
    with pytest.raises(ValueError, match=match):
        validate_experiment_config(cfg)
    cfg.checkpoint.keep_period = 2  # keeping every snapshot of the spacing also suffices
    if "max_to_keep" in str(overrides):
        validate_experiment_config(cfg)


@pytest.mark.parametrize("schedule", ["wsm", "wsd", "cosine"])
def test_comparison_configs(schedule):
    cfg = validate_experiment_config(wsm_compare.get_config(f"{schedule},400"))
    assert cfg.schedule.type == schedule and cfg.train.num_steps == 400
    assert wsm_compare.branch_step(cfg) == 320
    if schedule == "wsm":
        assert cfg.checkpoint.keep_period == 320 and cfg.eval.merged_num_snapshots == 8


def test_hf_output_is_refused_on_several_processes(tmp_path, monkeypatch):
    """The HF export reads the snapshot on one host: asked of a multi-process merge, it is
    refused before anything is read or written."""
    from experiments import merge as merge_command  # defines absl flags: import here only

    flags.FLAGS.unparse_flags()
    argv = ["merge", f"--workdir={tmp_path / 'run'}", f"--output={tmp_path / 'out'}"]
    flags.FLAGS([*argv, f"--hf_output={tmp_path / 'hf'}"])
    monkeypatch.setattr(merge_command.jax, "process_count", lambda: 2)
    with pytest.raises(app.UsageError, match="--hf_output exports on one process"):
        merge_command.main(argv[:1])
    assert not os.listdir(tmp_path)
