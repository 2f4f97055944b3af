"""Metric writers (clu) and throughput accounting (tokens/s, MFU).

`make_writer(workdir)` writes every scalar to three places: the console (absl logging),
TensorBoard event files and `<workdir>/metrics.jsonl` (one JSON object per `write_scalars`
call: `{"step": 10, "train/loss": 3.2, ...}`), the file that sweeps and merges read back.
Only process 0 writes files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers

from ling_jax.io import paths

METRICS_FILE = "metrics.jsonl"

# Peak dense bf16 FLOP/s per chip (vendor figures), by `device_kind` prefix.
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}


class JsonlWriter(metric_writers.MetricWriter):
    """Appends scalars to a JSON-lines file; other kinds of summaries are ignored."""

    def __init__(self, path: str):
        self._path = path
        # A bucket has no append: its object is rewritten whole on each flush.
        self._file = (
            _RewrittenObject(path) if paths.is_remote(path) else open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step)}
        record.update({name: float(np.asarray(value)) for name, value in scalars.items()})
        self._file.write(json.dumps(record) + "\n")

    def write_summaries(self, step, values, metadata=None) -> None:
        pass

    def write_images(self, step, images) -> None:
        pass

    def write_videos(self, step, videos) -> None:
        pass

    def write_audios(self, step, audios, *, sample_rate) -> None:
        pass

    def write_texts(self, step, texts) -> None:
        pass

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        pass

    def write_hparams(self, hparams) -> None:
        self._file.write(json.dumps({"hparams": _jsonable(hparams)}) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _RewrittenObject:
    """Append-mode text file over a bucket object: lines kept in memory, written on flush."""

    def __init__(self, path: str):
        self._path = path
        self._text = paths.read_text(path) if paths.exists(path) else ""

    def write(self, text: str) -> None:
        self._text += text

    def flush(self) -> None:
        paths.write_text(self._path, self._text)

    def close(self) -> None:
        self.flush()


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def make_writer(workdir: str) -> metric_writers.MetricWriter:
    """Console + TensorBoard + metrics.jsonl on process 0; console only elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.create_default_writer(just_logging=True)
    paths.makedirs(workdir)
    # TensorFlow's GCS client cannot be pointed at an emulator: there, no event files (this
    # TensorFlow writer is being replaced by a TensorFlow-free one, issue #16 item 8).
    emulated = paths.is_remote(workdir) and os.environ.get("STORAGE_EMULATOR_HOST")
    return metric_writers.MultiWriter(
        [
            metric_writers.create_default_writer(None if emulated else workdir, asynchronous=False),
            JsonlWriter(paths.join(workdir, METRICS_FILE)),
        ]
    )


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The scalar records of `<workdir>/metrics.jsonl`, in order (hparams lines skipped)."""
    text = paths.read_text(paths.join(workdir, METRICS_FILE))
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in records if "step" in r]


_measured_cpu_peak: float | None = None


def measure_matmul_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matmul on the default device: the attainable peak on a CPU."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    global _measured_cpu_peak
    device = device or jax.devices()[0]
    kind = device.device_kind
    for prefix, flops in sorted(PEAK_FLOPS_BY_DEVICE_KIND.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return flops, f"table ({kind})"
    if device.platform == "cpu":
        if _measured_cpu_peak is None:
            _measured_cpu_peak = measure_matmul_peak_flops()
        return _measured_cpu_peak, "measured fp32 matmul on this CPU"
    raise ValueError(
        f"no peak FLOP/s known for device kind {kind!r}; add it to PEAK_FLOPS_BY_DEVICE_KIND"
    )


def model_flops_utilization(
    tokens_per_second: float, flops_per_token: float, peak_flops_per_device: float
) -> float:
    """Achieved model FLOP/s over the peak of all devices."""
    return tokens_per_second * flops_per_token / (peak_flops_per_device * jax.device_count())
