"""Metric writers and throughput accounting (tokens/s, MFU).

`make_writer(workdir)` writes every scalar to two places: TensorBoard event files (tensorboardX,
no TensorFlow) and `<workdir>/metrics.jsonl` (one JSON object per `write_scalars` call:
`{"step": 10, "train/loss": 3.2, ...}`), the file that sweeps and merges read back. Only
process 0 writes files. The console gets short lines instead (`ling_jax.train.console`).

MFU divides by `peak_flops_per_device()`, which says where its figure comes from: the
`LING_JAX_PEAK_FLOPS` environment variable if set, else the vendor table below, else (CPU
only) a matmul measured on this machine.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# clu's method names without its TensorFlow import; JsonlWriter below subclasses the interface.
from ling_jax.train import writers as metric_writers

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
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

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


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def make_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard + metrics.jsonl on process 0; a writer that writes nothing elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    if "://" not in workdir:  # Object stores (gs://) have no folders to create.
        os.makedirs(workdir, exist_ok=True)
    return metric_writers.MultiWriter(
        [
            metric_writers.TensorBoardWriter(workdir),
            JsonlWriter(os.path.join(workdir, METRICS_FILE)),
        ]
    )


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The scalar records of `<workdir>/metrics.jsonl`, in order (hparams lines skipped)."""
    path = os.path.join(workdir, METRICS_FILE)
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "step" in r]


PEAK_FLOPS_ENV = "LING_JAX_PEAK_FLOPS"

_measured_cpu_peak: tuple[float, str] | None = None


def measure_matmul_peak_flops(
    size: int = 2048, repeats: int = 5, min_seconds: float = 0.25, clock=time.perf_counter
) -> float:
    """FLOP/s of a large fp32 matmul on the default device: the attainable peak on a CPU.

    Each of `repeats` timings runs the matmul as often as needed to last `min_seconds`, and the
    best one counts: a timing slowed by other processes on the machine would overstate MFU.
    """
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))  # Compiles.
    start = clock()
    jax.block_until_ready(matmul(a))  # Sizes the timed runs below.
    runs = max(1, math.ceil(min_seconds / max(clock() - start, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(runs):
            out = matmul(a)
        jax.block_until_ready(out)
        best = min(best, (clock() - start) / runs)
    return 2 * size**3 / best


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from); NaN for an unknown accelerator.

    Order: `$LING_JAX_PEAK_FLOPS`, the vendor table (dense bf16), a measurement on CPUs
    (best of 5 timings of a 2048^2 fp32 matmul, measured once per process).
    """
    global _measured_cpu_peak
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            value = math.nan
        if not value > 0 or math.isinf(value):
            raise ValueError(f"{PEAK_FLOPS_ENV}={override!r}: expected a positive FLOP/s number")
        return value, f"${PEAK_FLOPS_ENV}"
    device = device or jax.devices()[0]
    kind = device.device_kind
    for prefix, flops in sorted(PEAK_FLOPS_BY_DEVICE_KIND.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return flops, f"vendor dense bf16 peak for {kind}"
    if device.platform == "cpu":
        if _measured_cpu_peak is None:
            _measured_cpu_peak = (
                measure_matmul_peak_flops(),
                "measured on this CPU: best of 5 timings of a 2048^2 fp32 matmul",
            )
        return _measured_cpu_peak
    return math.nan, f"unknown for device kind {kind!r} (set ${PEAK_FLOPS_ENV}); MFU not reported"


def model_flops_utilization(
    tokens_per_second: float, flops_per_token: float, peak_flops_per_device: float
) -> float:
    """Achieved model FLOP/s over the peak of all devices."""
    return tokens_per_second * flops_per_token / (peak_flops_per_device * jax.device_count())
