"""Accelerator types: chips, hosts and topology per generation; bad names and topologies."""

from __future__ import annotations

import pytest

from launch.accelerators import LaunchError, default_topology, parse_accelerator


@pytest.mark.parametrize(
    "name, chips, hosts, chips_per_host, topology",
    [
        ("v5p-8", 4, 1, 4, "2x2x1"),
        ("v5p-256", 128, 32, 4, "4x4x8"),
        ("v5p-1024", 512, 128, 4, "8x8x8"),
        ("v4-32", 16, 4, 4, "2x2x4"),
        ("v6e-1", 1, 1, 1, "1x1"),
        ("v6e-8", 8, 1, 8, "2x4"),
        ("v6e-64", 64, 16, 4, "8x8"),
        ("v6e-256", 256, 64, 4, "16x16"),
        ("v5litepod-16", 16, 4, 4, "4x4"),
        ("v5litepod-128", 128, 32, 4, "8x16"),
    ],
)
def test_known_slices(name, chips, hosts, chips_per_host, topology):
    tpu = parse_accelerator(name)
    assert (tpu.chips, tpu.hosts, tpu.chips_per_host, tpu.topology) == (
        chips,
        hosts,
        chips_per_host,
        topology,
    )
    assert tpu.accelerator_type == name


def test_runtime_versions_and_gke_labels():
    assert parse_accelerator("v5p-64").runtime_version == "v2-alpha-tpuv5"
    assert parse_accelerator("v6e-64").runtime_version == "v2-alpha-tpuv6e"
    assert parse_accelerator("v5p-64").generation.gke_accelerator == "tpu-v5p-slice"
    assert parse_accelerator("v6e-64").generation.gke_accelerator == "tpu-v6e-slice"


def test_explicit_topology():
    assert parse_accelerator("v5p-24", "2x2x3").topology == "2x2x3"
    assert parse_accelerator("v5p-256", "2x8x8").topology == "2x8x8"


def test_default_topology_only_for_powers_of_two():
    assert default_topology(12, 3) is None
    assert default_topology(16, 2) == "4x4"


@pytest.mark.parametrize(
    "name, topology, message",
    [
        ("v7-8", None, "unknown accelerator type 'v7-8'"),
        ("v5p", None, "unknown accelerator type"),
        ("tpu-v5p-256", None, "unknown accelerator type"),
        ("v5p-7", None, "multiple of 2"),
        ("v5p-6", None, "multiple of 4 chips"),
        ("v6e-2", None, "not 2"),
        ("v5p-24", None, "pass --topology"),
        ("v5p-256", "4x4x4", "does not hold the 128 chips"),
        ("v5p-256", "16x8", "expected 3 axes"),
        ("v6e-64", "8-8", "expected 2 axes"),
    ],
)
def test_bad_accelerators(name, topology, message):
    with pytest.raises(LaunchError, match=message):
        parse_accelerator(name, topology)


def test_v5e_is_the_v5litepod_name():
    for chips in (1, 4, 256):
        assert parse_accelerator(f"v5e-{chips}") == parse_accelerator(f"v5litepod-{chips}")
    assert parse_accelerator("v5e-1").accelerator_type == "v5litepod-1"  # What gcloud takes.
    with pytest.raises(LaunchError, match="v5litepod slices have"):
        parse_accelerator("v5e-2")
