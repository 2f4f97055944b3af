"""Entry points run in child interpreters: one CPU device and the session's XLA cache.

The in-process tests cover the 8-device mesh; a child gets a single device so that its compile
is as small as the smoke config allows, and it reuses the compilations this session cached.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env() -> dict[str, str]:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )


def start_module(module: str, *args: str) -> subprocess.Popen:
    """`python -m module args...` from the repository root, output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_smoke_run(workdir, *overrides: str) -> subprocess.Popen:
    """`experiments.run` on the smoke config in `workdir`."""
    return start_module(
        "experiments.run",
        "--config=experiments/configs/smoke.py",
        f"--workdir={workdir}",
        *overrides,
    )
