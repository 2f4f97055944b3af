"""The README's cloud commands against the GCS emulator: data (ArrayRecord and JSONL files),
the trained tokenizer and the workdir all in a bucket.

One shared run: `experiments.run`'s config for 4 steps, then for 6 steps (a resume), then
`experiments.merge --hf_output` on it (both in this process, as tests/experiments do, which
shares the session's XLA cache), `python -m experiments.generate` on the merge (a subprocess)
and the sweep API on the run's folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from safetensors.numpy import load

from experiments.configs import smoke
from experiments.sweeps.results import collect, read_results, write_results
from experiments.sweeps.runner import _PointLog, check_manifest, point_status
from experiments.sweeps.spec import Point, Sweep
from ling_jax.convert.hf import load_pretrained
from ling_jax.data.tokenizer import load_tokenizer
from ling_jax.io import paths
from ling_jax.train.metrics import read_metrics
from ling_jax.train.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "experiments", "configs", "smoke.py")
_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")


def _documents(count: int, seed: int) -> list[str]:
    return [
        " ".join(_WORDS[(seed * 7 + i * 3 + j * j) % len(_WORDS)] for j in range(40 + i % 30))
        for i in range(count)
    ]


def _upload_corpus(root: str, local: str) -> None:
    """Two ArrayRecord files and one JSONL file under `root` (a bucket folder)."""
    from array_record.python import array_record_module

    for shard in range(2):
        name = f"part-{shard}.array_record"
        writer = array_record_module.ArrayRecordWriter(os.path.join(local, name), "group_size:1")
        for doc in _documents(60, shard):
            writer.write(doc.encode())
        writer.close()
        paths.copy(os.path.join(local, name), paths.join(root, name))
    lines = "".join(json.dumps({"text": doc}) + "\n" for doc in _documents(60, 2))
    paths.write_text(paths.join(root, "extra.jsonl"), lines)


def _config(bucket: str, num_steps: int):
    """The smoke run, with its data in the bucket (what --config.data.* flags would set)."""
    cfg = smoke.get_config()
    cfg.data.source = "files"
    cfg.data.train_files = f"{bucket}/data/*.array_record,{bucket}/data/*.jsonl"
    cfg.train.num_steps = num_steps
    return cfg


@pytest.fixture(scope="module")
def job(bucket, tmp_path_factory, monkeypatch_module):
    """(workdir URL, metrics after the first 4 steps) of a run of 4 steps resumed to 6."""
    local = tmp_path_factory.mktemp("corpus")
    _upload_corpus(paths.join(bucket, "data"), str(local))
    monkeypatch_module.setenv("LING_JAX_CACHE", str(tmp_path_factory.mktemp("remote_cache")))
    workdir = paths.join(bucket, "runs", "smoke")
    train_and_evaluate(_config(bucket, 4), workdir)
    first = read_metrics(workdir)
    train_and_evaluate(_config(bucket, 6), workdir)  # The same command, rerun: a resume.
    return workdir, first


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_run_and_resume_write_to_the_bucket(job):
    workdir, first = job
    assert {r["step"] for r in first if "train/loss" in r} == {1, 2, 3, 4}
    records = read_metrics(workdir)
    steps = [r["step"] for r in records if "train/loss" in r]
    # The rerun continued from snapshot 4: steps 1-4 are not trained twice.
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert records[: len(first)] == first
    assert paths.listdir(paths.join(workdir, "checkpoints")) == ["2", "4", "6"]
    assert paths.exists(paths.join(workdir, "tokenizer", "tokenizer.json"))
    assert not os.path.exists(os.path.join(REPO, "gs:"))  # The old abspath bug's footprint.


def test_tokenizer_loads_from_the_bucket(job):
    tokenizer = load_tokenizer(paths.join(job[0], "tokenizer", "tokenizer.json"), workdir=None)
    assert tokenizer.decode(tokenizer.encode("alpha beta")) == "alpha beta"


def test_merge_and_generate_in_the_bucket(job, bucket):
    from experiments import merge as merge_command  # Defines absl flags: imported here only.

    workdir, output = job[0], paths.join(bucket, "runs", "merged")
    hf_dir = paths.join(bucket, "hf")
    flags.FLAGS(
        [
            "merge",
            f"--config={SMOKE}",
            f"--workdir={workdir}",
            f"--output={output}",
            "--last=2",
            f"--hf_output={hf_dir}",
        ]
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        merge_command.main(["merge"])
    assert "merging 2 snapshots" in stdout.getvalue()
    assert paths.listdir(paths.join(output, "checkpoints")) == ["6"]
    assert paths.exists(paths.join(output, "tokenizer", "tokenizer.json"))
    # The HF export (`ling_jax.convert.hf.save_hf_state`) was uploaded; it loads back.
    index = json.loads(paths.read_text(paths.join(hf_dir, "model.safetensors.index.json")))
    shard = index["weight_map"]["model.word_embeddings.weight"]
    stored = load(paths.read_bytes(paths.join(hf_dir, shard)))["model.word_embeddings.weight"]
    model = load_pretrained(hf_dir, dtype="float32")
    np.testing.assert_array_equal(np.asarray(model.embed[...]), stored)
    command = [
        *(sys.executable, "-m", "experiments.generate", f"--checkpoint={output}"),
        *("--prompt=alpha beta", "--max_new_tokens=4", "--warmup=false"),
    ]
    generated = subprocess.run(
        command, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True
    )
    assert generated.returncode == 0, generated.stderr[-5000:]
    assert f"restored step 6 of {output}" in generated.stdout


def test_sweep_reads_and_writes_the_bucket(job, bucket):
    """The sweep API on a gs:// root whose point "smoke" is the shared run."""
    root = paths.join(bucket, "runs")
    files = f"{bucket}/data/*.jsonl"
    point = Point("smoke", SMOKE, {"data.source": "files", "data.train_files": files})
    sweep = Sweep("cloud", (point,))
    assert point_status(point, root).state == "done"
    check_manifest(sweep, root)
    assert json.loads(paths.read_text(paths.join(root, "sweep.json")))["points"] == {
        "smoke": point.definition()
    }
    csv_path, _ = write_results(collect(sweep, root), root)
    assert csv_path == paths.join(root, "results.csv")
    assert read_results(root)[0]["eval_curve"].keys() == {3, 4, 6}  # 4: the first run's end.
    assert f"--workdir={root}/smoke" in point.command(root)
    log = _PointLog(paths.join(root, "smoke", "run.log"))  # A run's stdout, then uploaded.
    os.write(log.fileno(), b"step 1\n")
    log.close()
    assert paths.read_text(paths.join(root, "smoke", "run.log")) == "step 1\n"
