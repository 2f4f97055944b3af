"""A GCS emulator (fake-gcs-server) for the session, and a fresh bucket per test module."""

from __future__ import annotations

import itertools

import pytest

from ling_jax.io.emulator import GcsEmulator, emulator_env, use_emulator

_buckets = itertools.count()


@pytest.fixture(scope="session")
def gcs_emulator():
    """Starts the emulator on a free port and points gcsfs, epath and tensorstore at it (the
    variables are restored when the session ends)."""
    with GcsEmulator() as emulator, pytest.MonkeyPatch.context() as patch:
        for key, value in emulator_env(emulator.url).items():
            patch.setenv(key, value)
        use_emulator(emulator.url)
        yield emulator


@pytest.fixture(scope="module")
def bucket(gcs_emulator) -> str:
    """A new empty bucket, as a `gs://` URL."""
    return gcs_emulator.create_bucket(f"test-bucket-{next(_buckets)}")
