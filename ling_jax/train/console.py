"""What the training loop prints: short lines, and throughput timed on finished steps.

    step 120/300 | loss 3.812 | 41.2k tok/s | MFU 12.3% | ETA 4m10s
    eval step 120 | loss 3.901 | 1.234 bits/byte | acc 41.2%

Steps run asynchronously: the loop gets a step's outputs back before the device has run it, so
a clock read after dispatching step N says nothing about step N. `StepTimer` is read only after
the caller has blocked on the window's last step (fetching its metrics does that), and its first
window starts after the first step of the process has finished, so compile time never counts
as training time. The full scalar set goes to metrics.jsonl and TensorBoard, not here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping


def format_duration(seconds: float) -> str:
    """45s, 4m10s, 2h05m, 3d04h; '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_rate(value: float) -> str:
    """950, 41.2k, 3.10M, 1.20G: three significant figures at most."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def format_train_line(
    step: int,
    num_steps: int,
    loss: float,
    tokens_per_sec: float | None = None,
    mfu: float | None = None,
    eta_seconds: float | None = None,
) -> str:
    """One log step. Fields that could not be measured (e.g. the compile step) are left out."""
    parts = [f"step {step}/{num_steps}", f"loss {loss:.3f}"]
    if tokens_per_sec is not None:
        parts.append(f"{format_rate(tokens_per_sec)} tok/s")
    if mfu is not None and math.isfinite(mfu):
        parts.append(f"MFU {100 * mfu:.1f}%")
    if eta_seconds is not None:
        parts.append(f"ETA {format_duration(eta_seconds)}")
    return " | ".join(parts)


def format_eval_line(step: int, metrics: Mapping[str, float], prefix: str = "eval/") -> str:
    """One evaluation: loss, bits per byte and accuracy of the `<prefix>...` metrics present
    (prefix "eval/merged_" for the merged-snapshot evaluation)."""
    label = {"eval/": "eval", "eval/merged_": "merged eval"}.get(prefix, prefix)
    parts = [f"{label} step {step}"]
    if f"{prefix}loss" in metrics:
        parts.append(f"loss {metrics[f'{prefix}loss']:.3f}")
    if f"{prefix}bits_per_byte" in metrics:
        parts.append(f"{metrics[f'{prefix}bits_per_byte']:.3f} bits/byte")
    if f"{prefix}accuracy" in metrics:
        parts.append(f"acc {100 * metrics[f'{prefix}accuracy']:.1f}%")
    return " | ".join(parts)


@dataclasses.dataclass(frozen=True)
class Window:
    """The steps finished since the previous window and the training seconds they took."""

    steps: int
    seconds: float
    eta_seconds: float  # For the remaining steps, at the wall-clock pace since the first window.

    @property
    def steps_per_sec(self) -> float | None:
        return self.steps / self.seconds if self.steps and self.seconds > 0 else None


class StepTimer:
    """Training time over finished steps, less the time between `pause()` and `resume()`.

    `start(step)` once step `step` has finished (the first, compiling, step of the process);
    `window(step, num_steps)` once step `step` has finished. Pause (for an evaluation, a probe)
    only after the queued steps have finished, or their time is lost.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._started_at: float | None = None
        self._paused_at: float | None = None

    @property
    def started(self) -> bool:
        return self._started_at is not None

    def start(self, step: int) -> None:
        now = self._clock()
        self._started_at, self._started_step = now, step
        self._window_at, self._window_step, self._paused = now, step, 0.0

    def pause(self) -> None:
        """Stops counting training time (call after blocking on the queued steps)."""
        if self._paused_at is None:
            self._paused_at = self._clock()

    def resume(self) -> None:
        """Counts training time again; without a pause, does nothing."""
        if self._paused_at is not None:
            self._paused += self._clock() - self._paused_at
            self._paused_at = None

    def window(self, step: int, num_steps: int) -> Window:
        """Closes the current window at finished step `step` and opens the next one."""
        if self._started_at is None:
            raise RuntimeError("StepTimer.window() before start()")
        now = self._clock()
        if self._paused_at is not None:  # A window ends in a pause: count that pause so far.
            self._paused += now - self._paused_at
            self._paused_at = now
        steps = step - self._window_step
        seconds = now - self._window_at - self._paused
        done = step - self._started_step
        # Wall time, evaluations and saves included: the ETA says when the run will end.
        eta = (now - self._started_at) / done * (num_steps - step) if done else math.nan
        self._window_at, self._window_step, self._paused = now, step, 0.0
        return Window(steps, seconds, eta)
