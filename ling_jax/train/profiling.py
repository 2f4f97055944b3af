"""A jax.profiler trace of a window of training steps (config.logging.profile).

Replaces clu's `periodic_actions.Profile`, whose module imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


class ProfileWindow:
    """Traces the steps after `first_step` (`num_steps` of them) into `logdir`."""

    def __init__(
        self,
        logdir: str,
        first_step: int,
        num_steps: int,
        start_trace: Callable[[str], None] = jax.profiler.start_trace,
        stop_trace: Callable[[], None] = jax.profiler.stop_trace,
    ):
        if num_steps < 1:
            raise ValueError(f"logging.profile_num_steps = {num_steps}: expected at least 1")
        self._logdir, self._first, self._last = logdir, first_step, first_step + num_steps
        self._start_trace, self._stop_trace = start_trace, stop_trace
        self._active = False

    def __call__(self, step: int, outputs: Any) -> None:
        """After dispatching step `step`; `outputs` are blocked on before the trace stops."""
        if step == self._first and not self._active:
            self._start_trace(self._logdir)
            self._active = True
        elif self._active and step >= self._last:
            self.close(outputs)

    def close(self, outputs: Any = None) -> None:
        if self._active:
            jax.block_until_ready(outputs)  # The trace must hold the steps' device work.
            self._stop_trace()
            self._active = False
