"""TensorBoard event files written to a bucket: uploads spaced in time, the rest on close."""

from __future__ import annotations

import os

from ling_jax.train import writers
from tests.train.test_writers import tensorboard_scalars


def test_tensorboard_writer_writes_to_gcs(bucket, tmp_path, monkeypatch):
    from google.cloud import storage

    bucket_name = bucket.removeprefix("gs://")

    def uploaded() -> dict[str, list[tuple[int, float]]]:
        blobs = list(storage.Client().list_blobs(bucket_name, prefix="runs/a/"))
        assert [os.path.basename(b.name)[:19] for b in blobs] == ["events.out.tfevents"]
        local = tmp_path / str(len(list(tmp_path.iterdir())))
        local.mkdir()
        blobs[0].download_to_filename(str(local / os.path.basename(blobs[0].name)))
        return tensorboard_scalars(str(local))

    monkeypatch.setattr(writers, "GCS_UPLOAD_SECONDS", 0.0)
    writer = writers.TensorBoardWriter(f"{bucket}/runs/a")
    writer.write_scalars(5, {"eval/loss": 3.25})
    writer.flush()
    assert uploaded()["eval/loss"] == [(5, 3.25)]
    monkeypatch.setattr(writers, "GCS_UPLOAD_SECONDS", 3600.0)
    writer.write_scalars(10, {"eval/loss": 3.0})
    writer.flush()  # Within GCS_UPLOAD_SECONDS of the last upload: not uploaded yet ...
    assert uploaded()["eval/loss"] == [(5, 3.25)]
    writer.close()  # ... and close() uploads the rest.
    assert uploaded()["eval/loss"] == [(5, 3.25), (10, 3.0)]
