"""One run per workdir: a lock that a second run on the same workdir is refused by.

    with hold_workdir_lock(workdir):
        ...  # train

Local (and NFS-like) workdirs: `fcntl.flock` on `<workdir>/run.lock`. The OS drops the lock
when the process dies, kill -9 included, so a stale lock cannot remain; the file only names the
holder (host, pid, start time) for the error message.

`gs://` (and other object-store) workdirs cannot flock: the lock is the object
`<workdir>/run.lock` holding the owner and a heartbeat time that a background thread renews
every `HEARTBEAT_S`. A lock renewed within `STALE_S` refuses the run; an older one (its owner
died without releasing it) is taken over with a warning. Object stores offer no atomic
create-if-absent through etils.epath, so two runs starting within the same second can both
win: the lock guards against the common mistake (a second launch), not a deliberate race.

Only process 0 of a multi-process run takes the lock (all processes share the workdir).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import jax
from absl import logging
from etils import epath

from ling_jax.io import paths

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir."""


def _owner() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "heartbeat": time.time(),
    }


def _describe(owner: dict) -> str:
    return (
        f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, "
        f"started {owner.get('started', '?')}"
    )


def _refusal(workdir: str, owner: dict) -> WorkdirLockedError:
    return WorkdirLockedError(
        f"workdir {workdir} is in use by another run ({_describe(owner)}); two runs in one "
        "workdir would interleave snapshots and metrics. Wait for it to finish, stop it, or "
        "use another --workdir."
    )


class FileLock:
    """`flock` on a local file; released by `release()` or by the process's death."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self._path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:  # The holder is between truncate and write.
                owner = {}
            os.close(fd)
            raise _refusal(self.workdir, owner) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # The file stays: unlinking it would race a new holder.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class HeartbeatLock:
    """An owner object renewed by a heartbeat thread, for stores without flock (gs://)."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.workdir = str(workdir)
        self._path = epath.Path(workdir) / LOCK_FILE
        self._heartbeat_s, self._stale_s = heartbeat_s, stale_s
        self._owner = _owner()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(self._path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # Torn or foreign content: treat as a holder of unknown age.
            return {}

    def acquire(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        held = self._read()
        if held:
            age = time.time() - float(held.get("heartbeat", 0))
            if age < self._stale_s:
                raise _refusal(self.workdir, held)
            logging.warning(
                "Taking over the stale lock of %s (%s; last heartbeat %.0f s ago).",
                self.workdir,
                _describe(held),
                age,
            )
        self._write()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
        self._thread.start()

    def _write(self) -> None:
        self._owner["heartbeat"] = time.time()
        self._path.write_text(json.dumps(self._owner))

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                self._write()
            except Exception as error:  # A transient store error must not kill training.
                logging.warning("Workdir lock heartbeat failed: %s", error)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()


def workdir_lock(workdir: str) -> FileLock | HeartbeatLock:
    """The lock kind that suits `workdir`: flock locally, a heartbeat object on gs://."""
    if paths.is_remote(str(workdir)):
        return HeartbeatLock(workdir)
    return FileLock(workdir)


@contextlib.contextmanager
def hold_workdir_lock(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock for the block on process 0; raises WorkdirLockedError if taken."""
    if jax.process_index() != 0:
        yield
        return
    lock = workdir_lock(workdir)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
