"""Cloud TPU accelerator types: chips, hosts, topology and the names gcloud and GKE use.

    slice = parse_accelerator("v5p-256")   # 128 chips, 32 hosts of 4 chips, topology 4x4x8
    slice = parse_accelerator("v6e-64")    # 64 chips, 16 hosts of 4 chips, topology 8x8

v4 and v5p names count TensorCores (two per chip); v5e (`v5litepod-N`, or `v5e-N`) and v6e
names count chips. Non-power-of-two slices (e.g. v5p-24, 2x2x3) exist; give their topology
explicitly.
"""

from __future__ import annotations

import dataclasses
import math
import re


class LaunchError(ValueError):
    """A bad launch argument, with the offending value and what was expected."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: how its accelerator names read and what hosts it has."""

    prefix: str  # the accelerator-type prefix, e.g. "v5p"
    cores_per_chip: int  # what the number in the name counts per chip (2: TensorCores)
    dims: int  # topology rank: 3 (torus) or 2
    chips_per_host: int  # chips per host of a multi-host slice
    max_single_host_chips: int  # the largest slice that is a single host
    runtime_version: str  # default TPU VM software version
    gke_accelerator: str  # node label cloud.google.com/gke-tpu-accelerator
    sizes: tuple[int, ...] = ()  # the only valid chip counts; empty: multiples of 4


GENERATIONS: dict[str, Generation] = {
    g.prefix: g
    for g in (
        Generation("v4", 2, 3, 4, 4, "tpu-ubuntu2204-base", "tpu-v4-podslice"),
        Generation("v5p", 2, 3, 4, 4, "v2-alpha-tpuv5", "tpu-v5p-slice"),
        Generation(
            "v5litepod",
            1,
            2,
            4,
            8,
            "v2-alpha-tpuv5-lite",
            "tpu-v5-lite-podslice",
            (1, 4, 8, 16, 32, 64, 128, 256),
        ),
        Generation(
            "v6e", 1, 2, 4, 8, "v2-alpha-tpuv6e", "tpu-v6e-slice", (1, 4, 8, 16, 32, 64, 128, 256)
        ),
    )
}

_NAME = re.compile(r"^([a-z0-9]+)-(\d+)$")
_TOPOLOGY = re.compile(r"^\d+(x\d+)+$")


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One slice of a TPU accelerator type."""

    accelerator_type: str  # e.g. "v5p-256", as gcloud takes it
    generation: Generation
    chips: int
    topology: str  # e.g. "4x4x8"

    @property
    def hosts(self) -> int:
        """TPU VM workers (GKE pods) per slice."""
        if self.chips <= self.generation.max_single_host_chips:
            return 1
        return self.chips // self.generation.chips_per_host

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def runtime_version(self) -> str:
        return self.generation.runtime_version


def default_topology(chips: int, dims: int) -> str | None:
    """The usual topology of a power-of-two slice (4 -> 2x2x1, 128 -> 4x4x8, 64 -> 8x8), or None.

    Doubling the smallest axis keeps the torus as even as possible, the shapes Cloud TPU offers.
    """
    if chips < 1 or chips & (chips - 1):
        return None
    shape = [1] * dims
    for _ in range(int(math.log2(chips))):
        shape[shape.index(min(shape))] *= 2
    if dims == 3 and shape[-1] == 1:
        return "x".join(map(str, shape))  # v4-8 / v5p-8 are named 2x2x1
    return "x".join(map(str, sorted(shape)))


def parse_accelerator(accelerator_type: str, topology: str | None = None) -> TpuSlice:
    """Parses an accelerator type such as v5p-256 or v6e-64; `topology` overrides the default."""
    known = ", ".join(f"{p}-N" for p in GENERATIONS)
    if accelerator_type.startswith("v5e-"):  # The chip's common name; gcloud calls it v5litepod.
        accelerator_type = "v5litepod-" + accelerator_type.removeprefix("v5e-")
    match = _NAME.match(accelerator_type)
    if not match or match.group(1) not in GENERATIONS:
        raise LaunchError(
            f"unknown accelerator type {accelerator_type!r}: expected one of {known} "
            "(e.g. v5p-256, v6e-64, v5litepod-16, v4-32)"
        )
    gen = GENERATIONS[match.group(1)]
    count = int(match.group(2))
    if count % gen.cores_per_chip:
        raise LaunchError(
            f"accelerator type {accelerator_type!r}: {gen.prefix} names count TensorCores "
            f"({gen.cores_per_chip} per chip), so the number must be a multiple of "
            f"{gen.cores_per_chip}"
        )
    chips = count // gen.cores_per_chip
    if gen.sizes and chips not in gen.sizes:
        raise LaunchError(
            f"accelerator type {accelerator_type!r}: {gen.prefix} slices have "
            f"{', '.join(map(str, gen.sizes))} chips, not {chips}"
        )
    if not gen.sizes and (chips < 4 or chips % 4):
        smallest = 4 * gen.cores_per_chip
        raise LaunchError(
            f"accelerator type {accelerator_type!r}: {gen.prefix} slices have a multiple of 4 "
            f"chips (the smallest is {gen.prefix}-{smallest}), not {chips}"
        )
    if topology is None:
        topology = default_topology(chips, gen.dims)
        if topology is None:
            raise LaunchError(
                f"accelerator type {accelerator_type!r} ({chips} chips) has no default "
                f"topology: pass --topology (e.g. 2x2x3)"
            )
    else:
        if not _TOPOLOGY.match(topology) or topology.count("x") + 1 != gen.dims:
            raise LaunchError(
                f"topology {topology!r}: expected {gen.dims} axes like "
                f"{'2x2x4' if gen.dims == 3 else '4x8'} for {gen.prefix}"
            )
        if math.prod(int(d) for d in topology.split("x")) != chips:
            raise LaunchError(
                f"topology {topology!r} does not hold the {chips} chips of {accelerator_type}"
            )
    return TpuSlice(accelerator_type, gen, chips, topology)
