"""Loading a run's snapshot for inference, and `python -m experiments.generate` end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from ling_jax.infer import load_checkpoint
from ling_jax.infer.loading import config_from_meta, snapshot_model_config
from ling_jax.train.checkpointing import _identity_fields
from tests.infer.run_dir import make_run_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_logits = nnx.jit(lambda model, ids: model(ids).logits)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A workdir as experiments.run leaves it: tokenizer/ and checkpoints/<step>/{state,...}."""
    workdir = str(tmp_path_factory.mktemp("run"))
    return (workdir, *make_run_dir(workdir))


def test_restores_params_and_expert_bias(run_dir):
    workdir, cfg, ids, reference = run_dir
    model, step = load_checkpoint(workdir, dtype="float32")  # dtype is not in the snapshot.
    assert step == 7 and model.config.vocab_size == 320 and model.config.dtype == "float32"
    np.testing.assert_allclose(_logits(model, ids), reference, atol=1e-6)


def test_snapshot_config_and_mtp_free_restore(run_dir):
    workdir, cfg, ids, reference = run_dir
    config, step = snapshot_model_config(workdir)
    assert step == 7 and _identity_fields(config) == _identity_fields(cfg)
    config.mtp.num_layers = 0  # Generation skips the MTP layer: it is not read.
    model, _ = load_checkpoint(workdir, config=config, dtype="float32")
    assert model.mtp is None
    np.testing.assert_allclose(_logits(model, ids), reference, atol=1e-6)


def test_bad_workdir_and_step(tmp_path, run_dir):
    with pytest.raises(ValueError, match="not an experiments.run workdir"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="no snapshot 3"):
        load_checkpoint(run_dir[0], step=3)
    with pytest.raises(ValueError, match="unknown model field"):
        config_from_meta({"attention.flash": True})


def test_generate_cli_streams_and_reports_throughput(run_dir):
    workdir = run_dir[0]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.generate",
            f"--checkpoint={workdir}",
            "--prompt=def add(",
            "--max_new_tokens=6",
            "--temperature=0.8",
            "--top_k=40",
        ],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[restored step 7 of" in result.stdout
    assert "prefill:" in result.stdout and "tokens/s" in result.stdout
