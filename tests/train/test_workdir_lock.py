"""One run per workdir: flock locally (dies with its process), a heartbeat object on gs://."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ling_jax.train.workdir_lock import (
    LOCK_FILE,
    FileLock,
    HeartbeatLock,
    WorkdirLockedError,
    hold_workdir_lock,
)


def test_second_holder_is_refused_naming_workdir_and_holder(tmp_path):
    refused = pytest.raises(WorkdirLockedError, match=rf"{tmp_path} is in use .*pid {os.getpid()}")
    with hold_workdir_lock(str(tmp_path)), refused:
        FileLock(str(tmp_path)).acquire()
    with hold_workdir_lock(str(tmp_path)):  # Released: free again.
        pass


def test_kill_9_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ling_jax.train.workdir_lock import FileLock; "
            f"FileLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid}"):
        FileLock(str(tmp_path)).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lock = FileLock(str(tmp_path))
    lock.acquire()
    lock.release()


def test_heartbeat_lock_refuses_a_fresh_holder_and_takes_over_a_stale_one(tmp_path, caplog):
    first = HeartbeatLock(str(tmp_path), heartbeat_s=0.05, stale_s=5.0)
    first.acquire()
    time.sleep(0.2)
    beat = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    assert time.time() - beat < 1.0  # The thread renews it.
    with pytest.raises(WorkdirLockedError, match=rf"{tmp_path} is in use"):
        HeartbeatLock(str(tmp_path), stale_s=5.0).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()

    stale = {"host": "gone", "pid": 1, "started": "long ago", "heartbeat": time.time() - 600}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    second = HeartbeatLock(str(tmp_path), stale_s=120.0)
    second.acquire()
    assert "stale lock" in caplog.text and "host gone" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    second.release()
