"""Mesh construction and the logical-axis rules."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from ling_jax.parallel import default_mesh_config, logical_to_spec, make_mesh
from ling_jax.parallel.mesh import mesh_shape


def mesh_config(**ici):
    cfg = default_mesh_config()
    for axis in cfg.ici:
        cfg.ici[axis] = ici.get(axis, 1)
    return cfg


def test_minus_one_takes_the_rest():
    assert mesh_shape(default_mesh_config(), 8) == ([8, 1, 1, 1], [1, 1, 1, 1])
    assert mesh_shape(mesh_config(data=-1, expert=4), 8)[0] == [2, 1, 4, 1]
    cfg = mesh_config(data=-1, fsdp=2)
    cfg.dcn.data = -1
    assert mesh_shape(cfg, 8, num_slices=2) == ([2, 2, 1, 1], [2, 1, 1, 1])


def test_meshes_that_do_not_fit_the_devices_are_refused():
    with pytest.raises(ValueError, match=r"mesh.ici .* multiplies to 6, but there are 8 devices"):
        mesh_shape(mesh_config(data=2, expert=3), 8)
    with pytest.raises(ValueError, match="do not divide|does not divide"):
        mesh_shape(mesh_config(data=-1, expert=3), 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_shape(mesh_config(data=-1, fsdp=-1), 8)


def test_make_mesh_uses_every_device():
    mesh = make_mesh(mesh_config(data=2, expert=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
    assert mesh.devices.size == jax.device_count() == 8


def test_logical_rules():
    mesh = make_mesh(mesh_config(fsdp=2, expert=2, tensor=2))
    assert logical_to_spec(("exp", "embed", "expert_mlp"), mesh=mesh) == P(
        "expert", "fsdp", "tensor"
    )
    assert logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
    # Batch over every batch-like axis of size > 1; a mesh axis is used once per spec.
    assert logical_to_spec(("act_batch", "act_seq"), mesh=mesh) == P(("fsdp", "expert"), None)
    assert logical_to_spec(("vocab", "mlp"), mesh=mesh) == P("tensor", None)


def test_indivisible_dimension_names_the_tensor():
    mesh = make_mesh(mesh_config(tensor=8))
    with pytest.raises(ValueError, match=r"attention/out: dimension 0 \(heads\) of size 4"):
        logical_to_spec(("heads", "head_dim"), shape=(4, 16), mesh=mesh, name="attention/out")
    with pytest.raises(ValueError, match="no sharding rule"):
        logical_to_spec(("nonsense",))
