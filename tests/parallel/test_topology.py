"""TPU topologies by name for ahead-of-time compilation, single-chip slices included."""

from __future__ import annotations

import pytest

from ling_jax.parallel.topology import host_bounds, parse_topology, tpu_devices


def test_slices_smaller_than_a_host_name_their_own_host_bounds():
    assert parse_topology("v5e-1")[1:] == ("v5e:1x1", 1)
    assert host_bounds("v5e:1x1") == [1, 1, 1]
    assert host_bounds("v6e:1x2") == [1, 2, 1]
    assert host_bounds("v5p:2x1x1") == [2, 1, 1]
    assert host_bounds("v5e:2x2") is None and host_bounds("v5p:4x4x8") is None


@pytest.mark.parametrize(
    "name, chips", [("v5e-1", 1), ("v6e-2", 2), ("v5p:1x1x1", 1), ("v5e-8", 8)]
)
def test_compile_only_devices_of_small_and_large_slices(name, chips):
    chip, devices = tpu_devices(name)  # libtpu (the test extra's jax[tpu]), no TPU.
    assert len(devices) == chips and chip.name == name[:3]
