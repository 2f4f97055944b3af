"""The ragged expert-parallel exchange: same rows back as the dense one, only routed rows sent.

On 8 simulated CPU devices the ragged exchange runs through `emulated_ragged_all_to_all`
(XLA:CPU has no ragged-all-to-all), which is checked against the primitive's documented
semantics; a TPU ahead-of-time compile checks that the real primitive is what TPUs get, in the
forward and the backward pass.
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ling_jax.configs import get_preset
from ling_jax.configs.model_config import validate_model_config
from ling_jax.model.moe.expert_parallel import (
    EXPERT_AXIS,
    emulated_ragged_all_to_all,
    exchange_ragged,
    exchange_with_expert_owners,
    expert_exchange,
)
from ling_jax.model.moe.grouped_matmul import grouped_matmul

EP, LOCAL, N, EMBED = 8, 2, 24, 4  # 16 experts, 24 rows per device.
EXPERTS = EP * LOCAL


def cpu_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:EP]), (EXPERT_AXIS,))


def group_sizes(rng, kind: str) -> np.ndarray:
    """[EP, EXPERTS] rows per (device, expert), each row summing to N."""
    if kind == "balanced":
        return np.stack([rng.multinomial(N, [1 / EXPERTS] * EXPERTS) for _ in range(EP)])
    if kind == "all_to_one_device":  # Every device routes every row to device 3's experts.
        sizes = np.zeros((EP, EXPERTS), np.int64)
        sizes[:, 3 * LOCAL] = N - 5
        sizes[:, 3 * LOCAL + 1] = 5
        return sizes
    raise ValueError(kind)


def experts_compute(weights):
    """A per-local-expert linear map through the real grouped matmul (xla backend)."""

    def compute(rows, local_sizes, expected_rows=0):
        return grouped_matmul(
            rows, weights, local_sizes, backend="xla", tile_rows=8, expected_rows=expected_rows
        )

    return compute


def run_exchange(exchange, rows, sizes, weights):
    """Per-device exchange under shard_map; returns the loss-weighted output and its grads."""
    mesh = cpu_mesh()
    spec = PartitionSpec(EXPERT_AXIS)

    def per_device(rows, sizes, weights, cotangent):
        def loss(rows, weights):
            out = exchange(rows, sizes[0], experts_compute(weights))
            return jnp.vdot(out, cotangent), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(rows, weights)
        return out, *grads

    fn = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec),
    )
    shard = NamedSharding(mesh, spec)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=rows.shape), jnp.float32)
    args = (rows, sizes, weights, cotangent)
    return fn(*(jax.device_put(a, shard) for a in args))


@pytest.mark.parametrize("kind", ["balanced", "all_to_one_device"])
def test_ragged_exchange_matches_dense(kind):
    rng = np.random.default_rng(0)
    sizes = group_sizes(rng, kind)
    rows = jnp.asarray(rng.normal(size=(EP * N, EMBED)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(EXPERTS, EMBED, EMBED)), jnp.float32)
    sizes = jnp.asarray(sizes, jnp.int32)
    dense = functools.partial(exchange_with_expert_owners, axis=EXPERT_AXIS, axis_size=EP)
    ragged = functools.partial(exchange_ragged, axis=EXPERT_AXIS, axis_size=EP, native=False)
    got = run_exchange(ragged, rows, sizes, weights)
    ref = run_exchange(dense, rows, sizes, weights)
    # And against plain numpy: each device's rows times their expert's matrix.
    expected = np.zeros((EP * N, EMBED))
    for d in range(EP):
        expert = np.repeat(np.arange(EXPERTS), np.asarray(sizes[d]))
        block = np.asarray(rows[d * N : (d + 1) * N])
        expected[d * N : (d + 1) * N] = np.einsum("re,ref->rf", block, np.asarray(weights)[expert])
    np.testing.assert_allclose(got[0], expected, atol=1e-4, rtol=1e-4)
    for name, a, b in zip(("out", "d rows", "d weights"), got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


def reference_ragged_all_to_all(operands, outputs, in_off, send, out_off, recv):
    """numpy, from the jax.lax.ragged_all_to_all docstring: peer i's chunk j (rows
    in_off[i][j] : + send[i][j]) lands at out_off[i][j] in peer j's output."""
    outputs = [o.copy() for o in outputs]
    for i in range(len(operands)):
        for j in range(len(operands)):
            size = send[i][j]
            assert size == recv[j][i]
            outputs[j][out_off[i][j] : out_off[i][j] + size] = operands[i][
                in_off[i][j] : in_off[i][j] + size
            ]
    return outputs


def test_emulation_has_the_primitives_semantics():
    """Gaps between input chunks, unsorted output offsets and untouched output rows."""
    peers, n, out_rows = 4, 12, 10
    rng = np.random.default_rng(3)
    send = rng.integers(0, 3, size=(peers, peers)).astype(np.int32)  # [sender, receiver]
    in_off = np.zeros_like(send)  # int32 like send
    for i in range(peers):  # Chunks in reverse peer order, one unused row after each.
        pos = 0
        for j in reversed(range(peers)):
            in_off[i, j] = pos
            pos += send[i, j] + 1
    out_off = np.zeros_like(send)
    for j in range(peers):  # Receiver j stacks senders in reverse order from row 1.
        pos = 1
        for i in reversed(range(peers)):
            out_off[i, j] = pos
            pos += send[i, j]
    operands = rng.normal(size=(peers, n, 2)).astype(np.float32)
    outputs = np.full((peers, out_rows, 2), -7.0, np.float32)
    expected = reference_ragged_all_to_all(operands, outputs, in_off, send, out_off, send.T)

    mesh = Mesh(np.array(jax.devices()[:peers]), ("x",))
    spec = PartitionSpec("x")

    def per_device(op, out, a, b, c, d):
        return emulated_ragged_all_to_all(op[0], out[0], a[0], b[0], c[0], d[0], axis_name="x")[
            None
        ]

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec))
    args = [operands, outputs, in_off, send, out_off, send.T]
    args = [jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec)) for a in args]
    got = fn(*args)
    np.testing.assert_array_equal(np.asarray(got), np.stack(expected))


def test_unknown_dispatch_is_rejected():
    with pytest.raises(ValueError, match=r"'sparse'.*\('ragged', 'dense'\)"):
        expert_exchange("sparse", EP, "cpu")
    cfg = get_preset("tiny")
    cfg.moe.ep_dispatch = "sparse"
    with pytest.raises(ValueError, match=r"moe.ep_dispatch.*'sparse'"):
        validate_model_config(cfg)


def test_tpu_gets_the_ragged_all_to_all_primitive():
    """AOT compile for a 4-chip v5p slice: fwd + bwd hold ragged-all-to-all, no dense one of
    the row buffer (only the small count/offset exchanges stay dense)."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is not installed: pip install -e '.[tpu]'", pytrace=False)
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    mesh = Mesh(np.array(devices), (EXPERT_AXIS,))
    ep, n, embed, local = 4, 64, 128, 2
    exchange = expert_exchange("ragged", ep, devices[0].platform)
    spec = PartitionSpec(EXPERT_AXIS)

    def per_device(rows, sizes, weights):
        def loss(rows, weights):
            out = exchange(rows, sizes[0], experts_compute(weights))
            return jnp.sum(out.astype(jnp.float32) ** 2)  # The backward needs `out`.

        return jax.grad(loss, argnums=(0, 1))(rows, weights)

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec))
    shard = NamedSharding(mesh, spec)
    args = (
        jax.ShapeDtypeStruct((ep * n, embed), jnp.bfloat16, sharding=shard),
        jax.ShapeDtypeStruct((ep, ep * local), jnp.int32, sharding=shard),
        jax.ShapeDtypeStruct((ep * local, embed, embed), jnp.bfloat16, sharding=shard),
    )
    hlo = fn.lower(*args).compile().as_text()
    # Forward there and back, backward there and back.
    assert hlo.count("ragged-all-to-all(") >= 4, hlo.count("ragged-all-to-all(")
    for line in hlo.splitlines():
        if " all-to-all(" in line:
            assert "bf16[" not in line.split("all-to-all(")[0], line


def test_ragged_buffers_vary_with_the_rows():
    """With a second batch axis (fsdp), the native exchange's buffers must not be typed as
    replicated over it: the row gradient would then be summed over fsdp (a psum of the whole
    buffer in the backward pass, and wrong values). Traced only: XLA:CPU cannot compile it."""
    mesh = Mesh(np.array(jax.devices()[:EP]).reshape(4, 2), (EXPERT_AXIS, "fsdp"))
    exchange = functools.partial(exchange_ragged, axis=EXPERT_AXIS, axis_size=4, native=True)
    spec = PartitionSpec((EXPERT_AXIS, "fsdp"))

    def per_device(rows, sizes, weights):
        def loss(rows):
            out = exchange(rows, sizes[0], experts_compute(weights))
            return jnp.sum(out**2)

        return jax.grad(loss)(rows)

    weight_spec = PartitionSpec(EXPERT_AXIS)
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, weight_spec), out_specs=spec)
    jaxpr = jax.make_jaxpr(fn)(
        jax.ShapeDtypeStruct((EP * N, EMBED), jnp.float32),
        jax.ShapeDtypeStruct((EP, 4 * LOCAL), jnp.int32),
        jax.ShapeDtypeStruct((4 * LOCAL, EMBED, EMBED), jnp.float32),
    )
    text = str(jaxpr)
    assert text.count("ragged_all_to_all[") == 4
    # The only sum over fsdp is the expert weights' gradient (the weights are replicated over
    # fsdp inside the layer), computed though only d rows is asked for: [2 local, 4, 4].
    sums = [line.split("=")[0] for line in text.splitlines() if "psum" in line]
    assert sums and all(f"[{LOCAL},{EMBED},{EMBED}]" in s for s in sums), sums
