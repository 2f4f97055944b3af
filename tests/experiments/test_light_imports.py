"""No TensorFlow anywhere in a run, a light `experiments.sweeps`, and the run's console lines.

Each check runs in a fresh interpreter: this test process has imported plenty already.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax

from ling_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_importing_sweeps_loads_neither_the_trainer_nor_tensorflow():
    proc = run_python(
        "import sys, experiments.sweeps\n"
        "print(sorted(m for m in sys.modules if m == 'tensorflow' or m.endswith('.trainer')))"
    )
    assert proc.stdout.strip() == "[]"


def test_a_run_prints_short_lines_and_never_imports_tensorflow(tmp_path):
    workdir = tmp_path / "run"
    proc = run_python(
        "import sys\n"
        "from absl import app\n"
        "import experiments.run as run\n"
        "sys.argv = ['run', '--config=experiments/configs/smoke.py', "
        f"'--workdir={workdir}', '--config.train.num_steps=3', '--config.eval.max_batches=1']\n"
        "try:\n"
        "    app.run(run.main)\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('tensorflow loaded:', 'tensorflow' in sys.modules)\n"
    )
    assert "tensorflow loaded: False" in proc.stdout
    log = proc.stderr
    assert re.search(r"MFU peak: \S+ FLOP/s per device \(measured on this CPU", log)
    assert "Compiling the train step (and running step 1)..." in log
    assert re.search(r"Compiled and ran step 1 in [\d.]+ s", log)
    assert re.search(r"\] step 1/3 \| loss [\d.]+\n", log)  # the compile step: not timed
    assert re.search(r"\] step 3/3 \| loss [\d.]+ \| \S+ tok/s \| MFU [\d.]+% \| ETA 0s\n", log)
    assert re.search(r"\] eval step 3 \| loss [\d.]+ \| [\d.]+ bits/byte \| acc [\d.]+%\n", log)
    assert "train/loss" not in log  # the full scalar set stays in the files
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    train = {r["step"]: r for r in read_metrics(str(workdir)) if "train/loss" in r}
    assert "train/tokens_per_sec" not in train[1]  # step 1 compiled: it is not timed
    assert {"train/tokens_per_sec", "train/mfu", "train/peak_flops_per_device"} <= set(train[3])
    assert train[3]["uptime"] > 0  # sweeps' wall_seconds
