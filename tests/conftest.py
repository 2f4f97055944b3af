"""Session-wide test settings."""

from __future__ import annotations

import os

# Tests run on the CPU even where libtpu is installed (it is, for the TPU AOT tests, which
# build their TPU devices from topology descriptions, not from attached chips).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (installed for the TPU AOT tests) locks /tmp/libtpu_lockfile in every jax process;
# compile-only use needs no exclusive access, so several test processes may load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Eight simulated CPU devices, for the mesh tests and a data-parallel trainer; single-device
# code runs on the first one as usual.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import pytest


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for the session: a program compiled twice (e.g. a trainer run and
    its resumed rerun) is compiled once."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
