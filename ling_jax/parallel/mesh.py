"""The device mesh: `data`, `fsdp`, `expert` and `tensor` axes, within and across slices.

`mesh.ici` sizes the axes inside one slice (the fast interconnect), `mesh.dcn` across slices;
the mesh axis size is their product. One entry of each may be -1, meaning "whatever is left".

    data    pure data parallelism: parameters replicated, batch split
    fsdp    batch split and parameters/optimizer state sharded (gathered per layer when used)
    expert  batch split and routed experts sharded; tokens travel to their experts (all-to-all)
    tensor  attention heads and FFN widths split (Megatron-style tensor parallelism)
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Axes over which the batch (and so the tokens) is split.
BATCH_AXES = ("data", "fsdp", "expert")


def default_mesh_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.ici = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
    cfg.dcn = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1})
    return cfg


def _resolve(sizes: dict[str, int], total: int, where: str) -> list[int]:
    """Replaces a single -1 by the remaining factor; checks the product equals `total`."""
    unknown = [axis for axis in MESH_AXES if sizes[axis] == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh.{where}: at most one axis may be -1, got {unknown}")
    for axis in MESH_AXES:
        if sizes[axis] == 0 or sizes[axis] < -1:
            raise ValueError(f"mesh.{where}.{axis} = {sizes[axis]}: expected >= 1 or -1")
    known = math.prod(sizes[axis] for axis in MESH_AXES if sizes[axis] != -1)
    if unknown:
        if total % known:
            raise ValueError(
                f"mesh.{where}: the fixed axes multiply to {known}, which does not divide the "
                f"{total} devices"
            )
        sizes = {**sizes, unknown[0]: total // known}
    product = math.prod(sizes[axis] for axis in MESH_AXES)
    if product != total:
        raise ValueError(
            f"mesh.{where} = {dict(sizes)} multiplies to {product}, but there are {total} devices"
        )
    return [sizes[axis] for axis in MESH_AXES]


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int, num_slices: int = 1):
    """(ici sizes, dcn sizes) per axis in `MESH_AXES` order, -1 resolved."""
    if num_devices % num_slices:
        raise ValueError(f"{num_devices} devices do not split into {num_slices} slices")
    dcn = _resolve(dict(cfg.dcn), num_slices, "dcn")
    ici = _resolve(dict(cfg.ici), num_devices // num_slices, "ici")
    return ici, dcn


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    """Builds the mesh over `devices` (default: all), topology-aware where the platform allows."""
    devices = list(jax.devices() if devices is None else devices)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    ici, dcn = mesh_shape(cfg, len(devices), num_slices)
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices)
        except (NotImplementedError, ValueError, AssertionError):
            grid = np.array(devices).reshape(ici)
    return Mesh(grid, MESH_AXES)


def batch_axes_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)
