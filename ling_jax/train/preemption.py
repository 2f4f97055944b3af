"""Stop requests (SIGTERM from a scheduler, Ctrl-C from a user) turned into a clean stop.

One process: SIGTERM and SIGINT set a flag that the training loop checks after every step,
which then saves a snapshot and returns. While the job waits (start-up, the first batch, or a
later batch when a prefetch thread makes the wait safe to abandon) the signal raises
`Interrupted` instead, so a stalled start or a stalled read stops at once; a stop before the
first step writes no snapshot.

Several processes (a pod): each host gets its own SIGTERM, at its own step, so a per-process
flag would make hosts save different steps. JAX's preemption sync manager (started by
`jax.distributed.initialize`) owns SIGTERM there; every host asks it each step, through
orbax's `CheckpointManager.reached_preemption(step)`, whether the step all hosts agreed on has
come, and they all save that step and stop. Ctrl-C is handed to it as a SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import jax
from absl import logging

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal arrived while the job was waiting (see `Preemption.interruptible`).

    A BaseException, like KeyboardInterrupt, so that code catching `Exception` (e.g. to name a
    corrupt checkpoint) does not turn a stop into another error.
    """


class Preemption:
    """Installs the stop-signal handlers for the life of a `with` block.

    The block starts out interruptible (start-up is a wait); the first `interruptible()` block
    (the wait for the first batch) ends that.
    """

    def __init__(self, multiprocess: bool | None = None):
        self.multiprocess = jax.process_count() > 1 if multiprocess is None else multiprocess
        self.requested = False  # This process got a stop signal (one-process runs).
        self.signal_name = ""
        self._interruptible = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        # On several processes JAX's notifier already handles SIGTERM: keep it.
        handled = (signal.SIGINT,) if self.multiprocess else _SIGNALS
        for signum in handled:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._interruptible = True
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        self._interruptible = False

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.multiprocess:
            logging.warning("%s received: passing it to the hosts' preemption sync.", name)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C: the user does not want to wait.
        logging.warning("%s received: saving a snapshot and stopping.", name)
        self.requested, self.signal_name = True, name
        if self._interruptible:
            raise Interrupted(name)

    @contextlib.contextmanager
    def interruptible(self, enabled: bool = True) -> Iterator[None]:
        """A stop signal inside this block (or before it) raises `Interrupted`."""
        if not enabled or self.multiprocess:
            yield
            return
        if self.requested:
            raise Interrupted(self.signal_name)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def should_stop(self, step: int, checkpoint_manager) -> bool:
        """Whether to save `step` and stop: on every host at the same step.

        Called once per step by every process (the sync protocol needs each step).
        """
        if self.multiprocess:
            return bool(checkpoint_manager.reached_preemption(step))
        return self.requested
