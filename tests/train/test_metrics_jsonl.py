"""metrics.jsonl: atomic rewrites, a torn last line, rows after the restored snapshot."""

from __future__ import annotations

import json
import os

import pytest

from ling_jax.train.metrics import METRICS_FILE, JsonlWriter, read_metrics, truncate_metrics


def _write(workdir, steps, *, torn: str = "") -> str:
    path = os.path.join(workdir, METRICS_FILE)
    with open(path, "w") as f:
        f.write(json.dumps({"hparams": {"seed": 0}}) + "\n")
        f.writelines(json.dumps({"step": s, "train/loss": float(s)}) + "\n" for s in steps)
        f.write(torn)
    return path


def test_torn_last_line_is_skipped_and_nothing_before_it_lost(tmp_path, caplog):
    _write(tmp_path, [1, 2, 3], torn='{"step": 4, "train/lo')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    assert "torn" in caplog.text and "intact" in caplog.text


def test_a_bad_line_before_the_end_is_an_error(tmp_path):
    path = _write(tmp_path, [1, 2])
    with open(path, "a") as f:
        f.write("garbage\n" + json.dumps({"step": 3}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 4, is not JSON"):
        read_metrics(str(tmp_path))


def test_resume_drops_rows_after_the_snapshot_and_continues(tmp_path):
    path = _write(tmp_path, [1, 2, 3, 4, 5], torn='{"step": 6, "tr')
    assert truncate_metrics(str(tmp_path), 3) == 2
    writer = JsonlWriter(path)
    for step in (4, 5, 6):
        writer.write_scalars(step, {"train/loss": 10.0 + step})
    writer.write_hparams({"seed": 1})  # Replaces the earlier hparams line.
    writer.flush()
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["train/loss"] == 16.0
    with open(path) as f:
        lines = f.read().splitlines()
    assert sum("hparams" in line for line in lines) == 1 and '"seed": 1' in lines[0]
    assert sorted(os.listdir(tmp_path)) == [METRICS_FILE]  # No temporary file left over.
    writer.close()


def test_nothing_to_drop_leaves_the_file_as_is(tmp_path):
    path = _write(tmp_path, [1, 2])
    before = os.stat(path).st_mtime_ns
    assert truncate_metrics(str(tmp_path), 2) == 0
    assert os.stat(path).st_mtime_ns == before
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
