"""On 8 simulated devices, every mesh gives the single-device loss, gradients and router counts.

One training step (loss, gradient norm, updated parameters, updated expert biases) and a few
steps of training are compared for pure data parallelism, FSDP, expert parallelism (EP = 8,
with the default ragged token exchange and with the dense one), EP x FSDP and a mesh with
tensor parallelism.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from ling_jax.configs import get_preset
from ling_jax.model import LingForCausalLM
from ling_jax.parallel import default_mesh_config, make_mesh, use_sharding
from ling_jax.train import config as train_config
from ling_jax.train.optimizer import make_optimizer
from ling_jax.train.schedules import make_schedule
from ling_jax.train.sharded_state import init_sharded_train_state
from ling_jax.train.train_step import jit_train_step, make_train_step
from tests.train.conftest import FAST_COMPILE, packed_batch

MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "ep8": dict(expert=8),
    "ep8_dense": dict(expert=8),
    "ep4_fsdp2": dict(expert=4, fsdp=2),
    "data2_ep2_tp2": dict(data=2, expert=2, tensor=2),
}
# moe.ep_dispatch per mesh, where not the default ("ragged").
EP_DISPATCH = {"ep8_dense": "dense"}
STEPS = 3


def setup(ep_dispatch: str = "ragged"):
    model_cfg = get_preset("tiny")
    model_cfg.moe.ep_dispatch = ep_dispatch
    optim = train_config.default_optim_config()
    optim.peak_lr = 1e-2
    optim.bias_update_rate = 1e-2
    schedule_cfg = train_config.default_schedule_config()
    schedule_cfg.warmup_steps = 1
    train_cfg = train_config.default_train_config()
    train_cfg.batch_size = 8
    schedule = make_schedule(schedule_cfg, optim.peak_lr)
    return model_cfg, optim, train_cfg, schedule, make_optimizer(optim, schedule)


def batches():
    out = []
    for seed in range(STEPS):
        a, b = packed_batch(seed), packed_batch(seed + 100)
        out.append({k: np.concatenate([a[k], b[k]]) for k in a})  # 8 rows
    return out


def run(mesh_axes: dict[str, int] | None, ep_dispatch: str = "ragged"):
    model_cfg, optim, train_cfg, schedule, optimizer = setup(ep_dispatch)
    mesh_cfg = default_mesh_config()
    for axis in mesh_cfg.ici:
        mesh_cfg.ici[axis] = (mesh_axes or {}).get(axis, 1)
    devices = jax.devices() if mesh_axes else jax.devices()[:1]
    mesh = make_mesh(mesh_cfg, devices)
    graphdef, state, shardings = init_sharded_train_state(model_cfg, optimizer, mesh, seed=0)
    step = jit_train_step(
        make_train_step(graphdef, optimizer, schedule, train_cfg, optim, model_cfg),
        FAST_COMPILE,
        mesh=mesh,
        state_shardings=shardings,
    )
    history = []
    for batch in batches():
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


@pytest.fixture(scope="module")
def single_device():
    return run(None)


@pytest.mark.parametrize("name", sorted(MESHES))
def test_mesh_matches_single_device(name, single_device):
    state, history = run(MESHES[name], EP_DISPATCH.get(name, "ragged"))
    ref_state, ref_history = single_device
    for step, (got, ref) in enumerate(zip(history, ref_history, strict=True)):
        for key in ("loss", "ce", "mtp_loss", "grad_norm", "moe/max_load_ratio"):
            np.testing.assert_allclose(got[key], ref[key], rtol=2e-5, err_msg=f"{key} @ {step}")
    # Router counts drive the bias update: equal biases mean equal global counts every step.
    for got, ref in zip(
        jax.tree.leaves(state.expert_bias), jax.tree.leaves(ref_state.expert_bias), strict=True
    ):
        np.testing.assert_array_equal(got, ref)
    params = zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True)
    for got, ref in params:
        np.testing.assert_allclose(got, ref, atol=2e-5)


def test_expert_weights_are_sharded_over_the_expert_axis():
    model_cfg, _, _, _, optimizer = setup()
    mesh_cfg = default_mesh_config()
    mesh_cfg.ici.data, mesh_cfg.ici.expert = 1, 8
    mesh = make_mesh(mesh_cfg)
    _, state, _ = init_sharded_train_state(model_cfg, optimizer, mesh, seed=0)
    gate = state.params["moe_layers"]["blocks"]["ffn"]["experts"]["gate"]
    assert gate.shape == (2, 16, 64, 32)
    assert {s.data.shape for s in gate.addressable_shards} == {(2, 2, 64, 32)}


def test_shard_map_moe_is_used_only_with_a_mesh():
    model = nnx.eval_shape(lambda: LingForCausalLM(get_preset("tiny"), rngs=nnx.Rngs(0)))
    mesh_cfg = default_mesh_config()
    mesh = make_mesh(mesh_cfg)
    ids = jax.ShapeDtypeStruct((8, 16), np.int32)
    plain = jax.make_jaxpr(lambda m, i: m(i).logits)(model, ids)
    with use_sharding(mesh):
        sharded = jax.make_jaxpr(lambda m, i: m(i).logits)(model, ids)
    assert "shard_map" not in str(plain) and "shard_map" in str(sharded)
