"""Metric writers without TensorFlow: the writer interface, fan-out, and TensorBoard files.

clu's `metric_writers` package imports TensorFlow on import (its TF summary writer is loaded
by the package `__init__`), which made a 1.3 GB tensorflow-cpu install and a ~10 s import part
of every run. The interface here keeps clu's method names, so writers written against clu's
`MetricWriter` (e.g. `metrics.JsonlWriter`) work unchanged. TensorBoard event files are written
by tensorboardX, which needs no TensorFlow; `gs://` logdirs go through google-cloud-storage
(which honours `STORAGE_EMULATOR_HOST`) with the upload policy of `GcsEventFile`.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


class MetricWriter:
    """Receives scalars and hparams (the only summaries the trainer writes)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MultiWriter(MetricWriter):
    """Forwards every call to each writer in turn (none: writes nothing, e.g. on process > 0)."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self._writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for writer in self._writers:
            writer.write_scalars(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for writer in self._writers:
            writer.write_hparams(hparams)

    def flush(self) -> None:
        for writer in self._writers:
            writer.flush()

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


class TensorBoardWriter(MetricWriter):
    """Scalars as TensorBoard scalar summaries, hparams as a JSON text summary, in one event
    file under `logdir` (a local folder or `gs://bucket/path`).

    Writes synchronously through tensorboardX's `EventsWriter`: its `SummaryWriter` queues
    events for a background thread, so a flush does not mean the events are in the file.
    """

    def __init__(self, logdir: str):
        # Imported here: only process 0 writes files.
        from tensorboardX import record_writer
        from tensorboardX.event_file_writer import EventsWriter

        record_writer.register_writer_factory("gs", _GcsEventFileFactory())
        record_writer.directory_check(logdir)
        self._events = EventsWriter(logdir.rstrip("/") + "/events")

    def _write(self, step: int, summary) -> None:
        from tensorboardX.proto import event_pb2

        self._events.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        from tensorboardX.proto import summary_pb2

        values = [
            summary_pb2.Summary.Value(tag=name, simple_value=float(np.asarray(value)))
            for name, value in scalars.items()
        ]
        self._write(int(step), summary_pb2.Summary(value=values))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        from tensorboardX import summary

        # As text rather than the hparams plugin: tensorboardX's add_hparams writes a separate
        # run folder per call, which would show as a second run in TensorBoard.
        text = json.dumps(hparams, indent=2, sort_keys=True, default=str)
        self._write(0, summary.text("hparams", "```\n" + text + "\n```"))

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


# Seconds between uploads of a growing event file to GCS (close() always uploads).
GCS_UPLOAD_SECONDS = 60.0


class GcsEventFile:
    """An event file on GCS, for tensorboardX's record writer.

    GCS objects cannot be appended to, so the whole file is uploaded again on a flush; the
    trainer flushes every step, so uploads are spaced by `GCS_UPLOAD_SECONDS` (metrics.jsonl,
    not TensorBoard, is the record a crash must not lose). Replaces tensorboardX's own gs://
    writer, which uploads at every flush and once more when garbage-collected, even after
    close() (at interpreter exit, with retries of up to two minutes if GCS is unreachable).
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic):
        from google.cloud import storage

        bucket, _, name = path.removeprefix("gs://").partition("/")
        if not bucket or not name:
            raise ValueError(f"{path!r} is not a gs://bucket/object path")
        self._blob = storage.Client().bucket(bucket).blob(name)
        self._buffer = io.BytesIO()
        self._clock, self._uploaded_at, self._pending = clock, -float("inf"), False

    def write(self, data: bytes) -> None:
        self._buffer.write(data)
        self._pending = True

    def flush(self, force: bool = False) -> None:
        if self._pending and (force or self._clock() - self._uploaded_at >= GCS_UPLOAD_SECONDS):
            self._blob.upload_from_string(self._buffer.getvalue())
            self._uploaded_at, self._pending = self._clock(), False

    def close(self) -> None:
        self.flush(force=True)


class _GcsEventFileFactory:
    """tensorboardX's hook for `gs:` paths (see `tensorboardX.record_writer.open_file`)."""

    def open(self, path: str) -> GcsEventFile:
        return GcsEventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # Object stores have no folders to create.
