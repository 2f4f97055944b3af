"""Metric files without TensorFlow: TensorBoard events read back by TensorBoard's own reader,
locally (tests/cloud covers a bucket); the MFU peak and where it comes from."""

from __future__ import annotations

import math
import types

import pytest
from tensorboard.backend.event_processing import event_accumulator

from ling_jax.train import metrics, writers


def tensorboard_events(logdir: str) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(logdir)
    events.Reload()
    return events


def tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    events = tensorboard_events(logdir)
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_make_writer_writes_tensorboard_events_and_jsonl(tmp_path):
    workdir = str(tmp_path / "run")
    writer = metrics.make_writer(workdir)
    writer.write_hparams({"optim": {"peak_lr": 3e-3}})
    writer.write_scalars(1, {"train/loss": 4.5, "train/mfu": 0.25})
    writer.write_scalars(2, {"train/loss": 4.0})
    writer.close()
    scalars = tensorboard_scalars(workdir)
    assert scalars["train/loss"] == [(1, 4.5), (2, 4.0)]
    assert scalars["train/mfu"] == [(1, 0.25)]
    assert [r["step"] for r in metrics.read_metrics(workdir)] == [1, 2]
    (hparams,) = tensorboard_events(workdir).Tensors("hparams/text_summary")
    assert b'"peak_lr": 0.003' in hparams.tensor_proto.string_val[0]


def test_gcs_event_file_path_must_name_an_object():
    with pytest.raises(ValueError, match="gs://bucket/object"):
        writers.GcsEventFile("gs://only-a-bucket")


def fake_device(kind: str, platform: str = "tpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


def test_peak_from_the_vendor_table(monkeypatch):
    monkeypatch.delenv(metrics.PEAK_FLOPS_ENV, raising=False)
    peak, source = metrics.peak_flops_per_device(fake_device("TPU v5 lite"))
    assert peak == 197e12 and "vendor" in source and "TPU v5 lite" in source


def test_peak_of_an_unknown_accelerator_is_nan_and_says_so(monkeypatch):
    monkeypatch.delenv(metrics.PEAK_FLOPS_ENV, raising=False)
    peak, source = metrics.peak_flops_per_device(fake_device("Some GPU 9000", "gpu"))
    assert math.isnan(peak)
    assert "Some GPU 9000" in source and metrics.PEAK_FLOPS_ENV in source


def test_peak_from_the_environment(monkeypatch):
    monkeypatch.setenv(metrics.PEAK_FLOPS_ENV, "1.5e14")
    assert metrics.peak_flops_per_device(fake_device("TPU v4")) == (
        1.5e14,
        f"${metrics.PEAK_FLOPS_ENV}",
    )
    for bad in ("fast", "0", "-3", "inf"):
        monkeypatch.setenv(metrics.PEAK_FLOPS_ENV, bad)
        with pytest.raises(ValueError, match=metrics.PEAK_FLOPS_ENV):
            metrics.peak_flops_per_device(fake_device("TPU v4"))


def test_cpu_peak_is_measured_once_and_names_its_source(monkeypatch):
    monkeypatch.delenv(metrics.PEAK_FLOPS_ENV, raising=False)
    monkeypatch.setattr(metrics, "_measured_cpu_peak", None)
    calls = []
    monkeypatch.setattr(metrics, "measure_matmul_peak_flops", lambda: calls.append(1) or 5e10)
    for _ in range(2):
        peak, source = metrics.peak_flops_per_device(fake_device("cpu", "cpu"))
        assert peak == 5e10 and "measured on this CPU" in source
    assert calls == [1]


def test_matmul_peak_takes_the_best_of_repeated_timings():
    # Sizing run: 0.1 s, so each timing runs the matmul ceil(0.25 / 0.1) = 3 times; the best
    # timing (0.15 s for 3) counts, not the mean or the slowed ones.
    ticks = iter([0.0, 0.1] + [0.0, 0.9, 0.0, 0.15, 0.0, 0.3, 0.0, 2.0, 0.0, 0.6])
    flops = metrics.measure_matmul_peak_flops(size=64, repeats=5, clock=lambda: next(ticks))
    assert flops == pytest.approx(2 * 64**3 / 0.05)


def test_matmul_peak_measures_this_machine():
    flops = metrics.measure_matmul_peak_flops(size=256, repeats=2, min_seconds=0.01)
    assert 1e8 < flops < 1e14
