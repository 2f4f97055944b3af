"""TPU topologies by name, for ahead-of-time compilation from a machine without TPUs.

`tpu_devices("v5p-256")` returns compile-only devices of a 256-chip v5p slice (libtpu must be
installed; no TPU is needed). Names are `<generation>-<chips>` (v4, v5e, v5p, v6e) or a raw
topology such as `v5p:8x8x4`.
"""

from __future__ import annotations

import dataclasses
import math


# Per-chip figures: HBM bytes, peak dense bf16 FLOP/s, HBM bandwidth (bytes/s), mesh rank.
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    torus_dims: int


CHIPS = {
    "v4": Chip("v4", 32 * 2**30, 275e12, 1.2e12, 3),
    "v5e": Chip("v5e", 16 * 2**30, 197e12, 8.2e11, 2),
    "v5p": Chip("v5p", 95 * 2**30, 459e12, 2.76e12, 3),
    "v6e": Chip("v6e", 32 * 2**30, 918e12, 1.64e12, 2),
}


def _grid(chips: int, dims: int) -> list[int]:
    """The most cubic power-of-two grid with `chips` chips, smallest dimension first."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: expected a power of two")
    shape = [1] * dims
    for _ in range(int(math.log2(chips))):
        shape[shape.index(min(shape))] *= 2
    return sorted(shape)


def parse_topology(name: str) -> tuple[Chip, str, int]:
    """(chip, topology string for get_topology_desc, number of chips)."""
    if ":" in name:
        generation, shape = name.split(":", 1)
        dims = [int(d) for d in shape.split("x")]
        chips = math.prod(dims)
    elif "-" in name:
        generation, count = name.split("-", 1)
        if not count.isdigit():
            raise ValueError(f"topology {name!r}: expected <generation>-<chips>, e.g. v5p-256")
        chips = int(count)
        if generation not in CHIPS:
            raise ValueError(f"topology {name!r}: unknown TPU generation; known: {sorted(CHIPS)}")
        dims = _grid(chips, CHIPS[generation].torus_dims)
        if CHIPS[generation].torus_dims == 3 and chips < 8:
            dims = sorted(dims, reverse=True)  # v5p:2x2x1 style for sub-cube slices
    else:
        raise ValueError(f"topology {name!r}: expected e.g. v5p-256 or v5p:8x8x4")
    if generation not in CHIPS:
        raise ValueError(f"topology {name!r}: unknown TPU generation; known: {sorted(CHIPS)}")
    return CHIPS[generation], f"{generation}:{'x'.join(map(str, dims))}", chips


# Chips one TPU host holds (2 x 2 x 1 on every generation here). libtpu lays a topology out in
# hosts of this shape, so a slice with fewer chips (v5e-1, v6e-2, v5p:1x1x1) must name its
# own, smaller host bounds or get_topology_desc refuses it.
_HOST_CHIPS = 4


def host_bounds(topology: str) -> list[int] | None:
    """`chips_per_host_bounds` for a slice smaller than one host (its own shape), else None."""
    dims = [int(d) for d in topology.split(":", 1)[1].split("x")]
    if math.prod(dims) >= _HOST_CHIPS:
        return None
    return dims + [1] * (3 - len(dims))


def tpu_devices(name: str):
    """Compile-only TPU devices of the named topology (needs libtpu: pip install -e .[tpu])."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("libtpu is not installed: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    chip, topology, chips = parse_topology(name)
    bounds = host_bounds(topology)
    kwargs = {} if bounds is None else {"chips_per_host_bounds": bounds}
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices
    if len(devices) != chips:
        raise ValueError(f"topology {name!r} gave {len(devices)} devices, expected {chips}")
    return chip, devices
