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
from absl import logging
from etils import epath

from ling_jax.io import paths

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
    """Scalars as JSON lines; other kinds of summaries are ignored.

    The records are kept in memory and `flush()` rewrites the whole file when something new was
    written: locally through a temporary file and a rename (a reader, or a kill -9, sees the
    old file or the new one, never half a line), on gs:// as one upload (objects cannot be
    appended to). An existing file is read back first, so a resumed run continues it; see
    `truncate_metrics` for dropping the rows a crashed run wrote after its last snapshot.
    """

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._lines = (
            [json.dumps(r) for r in _read_records(self._path)] if self._path.exists() else []
        )
        self._dirty = False

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step)}
        record.update({name: float(np.asarray(value)) for name, value in scalars.items()})
        self._lines.append(json.dumps(record))
        self._dirty = True

    def write_hparams(self, hparams) -> None:
        # One hparams line per file: a restarted fresh run replaces the earlier one.
        self._lines = [line for line in self._lines if not line.startswith('{"hparams"')]
        self._lines.insert(0, json.dumps({"hparams": _jsonable(hparams)}))
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            _write_atomically(self._path, "".join(line + "\n" for line in self._lines))
            self._dirty = False

    def close(self) -> None:
        self.flush()


def _write_atomically(path: epath.Path, text: str) -> None:
    """Replaces `path` by `text`: temp file + rename locally, one upload on object stores."""
    if paths.is_remote(str(path)):
        path.write_text(text)
        return
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(text)
    os.replace(temp, path)


def read_hparams(workdir: str) -> dict[str, Any] | None:
    """The config the run in `workdir` last started with (its `hparams` record), or None."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    records = [r["hparams"] for r in _read_records(path) if "hparams" in r]
    return records[-1] if records else None


def _read_records(path: epath.Path) -> list[dict[str, Any]]:
    """Every JSON record of a jsonl file; a torn last line (kill -9 mid-write) is dropped with
    a warning, a bad line elsewhere raises ValueError naming the line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as error:
            if number == len(lines):
                logging.warning(
                    "%s: the last line (%d characters) is torn (a run killed while writing "
                    "it) and is ignored; every record before it is intact.",
                    path,
                    len(line),
                )
                break
            raise ValueError(f"{path}, line {number}, is not JSON: {error}") from error
    return records


def truncate_metrics(workdir: str, step: int) -> int:
    """Drops the rows of `<workdir>/metrics.jsonl` after `step` (those a crashed run wrote past
    the snapshot it is resumed from; the resumed run writes them again) and a torn last line.
    Returns the number of rows dropped; the file is rewritten atomically, and only if needed."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8")
    records = _read_records(path)
    kept = [r for r in records if r.get("step", -1) <= step]
    torn = bool(text) and not text.endswith("\n")
    if len(kept) < len(records) or torn:
        _write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
        logging.info(
            "%s: dropped %d rows after step %d (written after the last snapshot)",
            path,
            len(records) - len(kept),
            step,
        )
    return len(records) - len(kept)


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
    paths.makedirs(workdir)
    return metric_writers.MultiWriter(
        [
            metric_writers.TensorBoardWriter(workdir),
            JsonlWriter(paths.join(workdir, METRICS_FILE)),
        ]
    )


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The scalar records of `<workdir>/metrics.jsonl`, in order (hparams lines skipped).

    A torn last line (a run killed mid-write) is skipped with a warning; nothing before it is
    lost. Raises FileNotFoundError if the file does not exist."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return [r for r in _read_records(path) if "step" in r]


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
