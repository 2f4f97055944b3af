"""The model with `fp8.enabled`: unchanged when off, close to the high-precision model when on,
the safeguard statistics, and the config section's validation."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ling_jax.configs import validate_model_config
from ling_jax.model import LingForCausalLM
from ling_jax.model import fp8 as model_fp8
from ling_jax.model.fp8 import safeguards
from ling_jax.train.fp8_monitor import probe_model
from tests.model.conftest import randomize, tiny_config


def fp8_config(mode="emulated", **fields):
    cfg = tiny_config()
    cfg.fp8.enabled = True
    cfg.fp8.mode = mode
    for key, value in fields.items():
        cfg.fp8[key] = value
    return cfg


def model_for(cfg):
    model = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))
    randomize(model)
    return model


def forward_jaxpr(cfg, ids):
    model = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids).logits)(state))


def test_disabled_fp8_traces_the_same_program_as_a_config_without_the_section(packed_batch):
    ids = jnp.asarray(packed_batch[0])
    off = tiny_config()
    assert off.fp8.enabled is False
    legacy = ml_collections.ConfigDict(off.to_dict())
    del legacy["fp8"]
    jaxpr = forward_jaxpr(off, ids)
    assert jaxpr == forward_jaxpr(legacy, ids)
    assert "f8_e4m3" not in jaxpr and "f8_e4m3" in forward_jaxpr(fp8_config(), ids)


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda m, ids, pos, seg: m(ids, pos, seg))


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_fp8_forward_is_close_to_the_high_precision_model(tiny_model, packed_batch, forward):
    state = nnx.state(tiny_model)
    fp8_model = model_for(fp8_config())
    nnx.update(fp8_model, state)
    base = forward(tiny_model, *packed_batch)
    out = forward(fp8_model, *packed_batch)
    # E4M3 keeps 3 mantissa bits (~2.5% RMS error per GEMM operand), and a few tokens switch
    # experts; the losses of training runs stay far closer (experiments/fp8_compare.py).
    assert relative_error(out.logits, base.logits) < 0.1
    assert relative_error(out.mtp_logits, base.mtp_logits) < 0.1

    native_model = model_for(fp8_config("native"))
    nnx.update(native_model, state)
    native = forward(native_model, *packed_batch)
    assert relative_error(native.logits, out.logits) < 1e-4


def test_plan_names_how_each_gemm_runs():
    cfg = fp8_config("auto")
    auto = "native" if model_fp8.native_hardware() else "emulated"  # H100: native; CPU: not.
    assert model_fp8.plan(cfg) == {"dense": auto, "experts": "emulated", "wgrad": "fp8"}
    cfg.fp8.mode, cfg.fp8.wgrad, cfg.moe.backend = "native", "input", "pallas"
    assert model_fp8.plan(cfg) == {"dense": "native", "experts": "native", "wgrad": "input"}


def test_probe_records_every_op_of_every_layer(tiny_model, packed_batch):
    fp8_model = model_for(fp8_config())
    nnx.update(fp8_model, nnx.state(tiny_model))
    ids, positions, segments = (jnp.asarray(a) for a in packed_batch)
    batch = {
        "input_ids": ids,
        "positions": positions,
        "segment_ids": segments,
        "targets": jnp.roll(ids, -1, axis=1),
        "loss_mask": (segments != 0).astype(jnp.float32),
    }
    probe = jax.jit(lambda s: probe_model(nnx.merge(nnx.graphdef(fp8_model), s), batch, 0.1))
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        metrics = probe(nnx.state(fp8_model))
    dense = ("attn_qkv", "attn_out", "mlp_gate", "mlp_up", "mlp_down")
    moe = ("attn_qkv", "attn_out", "experts_gate_up", "experts_down")
    moe += ("shared_gate", "shared_up", "shared_down")
    layers = [("layer_00", dense), ("layer_01", moe), ("layer_02", moe), ("mtp", moe)]
    expected = {
        f"fp8/{stat}/{layer}/{op}/{tensor}"
        for layer, ops in layers
        for op in ops
        for stat in ("underflow", "distortion")
        for tensor in ("input", "weight", "grad")
    }
    assert set(metrics) == expected
    values = {k: float(v) for k, v in metrics.items()}
    assert all(0 <= v <= 1e-2 for k, v in values.items() if "/underflow/" in k)
    assert all(0.99 < v <= 1 + 1e-6 for k, v in values.items() if "/distortion/" in k)
    # Outside probing() nothing is recorded.
    forward_out = fp8_model(*packed_batch)
    assert forward_out.logits.shape[-1] == 256
    assert not nnx.state(fp8_model, nnx.Intermediate)
    assert not nnx.state(fp8_model, safeguards.GradTap)  # The probe merged its own copy.
    assert not [w for w in recorded if issubclass(w.category, DeprecationWarning)]


def test_round_trip_stats_on_crafted_tensors():
    # Representable values (E4M3 integers up to 448 = the amax): no error at all.
    exact = jnp.asarray(np.tile([448.0, -3.0, 0.5, 0.0, 1.0, 2.0, 6.0, 0.25], (4, 16)))
    stats = safeguards.rowwise_stats(exact)
    assert float(stats["underflow"]) == 0.0 and float(stats["distortion"]) == pytest.approx(1.0)
    # One 1 x 128 tile holds 448 and 127 values far below its smallest subnormal
    # (448 / 448 * 2^-9); the other tile is untouched: 127 of 256 non-zero elements flush.
    x = np.ones((1, 256), np.float32)
    x[0, :128] = 1e-6
    x[0, 0] = 448.0
    stats = safeguards.rowwise_stats(jnp.asarray(x))
    assert float(stats["underflow"]) == pytest.approx(127 / 256)
    assert float(stats["distortion"]) == pytest.approx(1.0, abs=1e-6)  # 448 dominates.
    # Exact zeros are not underflow; an all-zero tensor is undistorted.
    zeros = safeguards.blockwise_stats(jnp.zeros((2, 128, 128)))
    assert float(zeros["underflow"]) == 0.0 and float(zeros["distortion"]) == 1.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "fast"),
        ("wgrad", "bf16"),
        ("monitor_every_steps", -1),
        ("underflow_warn", 2.0),
        ("distortion_warn", 1.5),
    ],
)
def test_fp8_config_errors_name_the_field(field, value):
    cfg = tiny_config()
    cfg.fp8[field] = value
    with pytest.raises(ValueError, match=f"`fp8.{field}`"):
        validate_model_config(cfg)


def test_grad_tap_carries_the_output_gradient_statistics():
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=(6, 200)), jnp.float32)
    dy = rng.normal(size=(6, 200)) * 10.0 ** rng.uniform(-8, 0, size=(6, 200))
    dy = jnp.asarray(dy, jnp.float32)
    tapped = jax.grad(lambda t: jnp.sum(safeguards._grad_tap(y, t) * dy))(jnp.zeros(2))
    expected = safeguards.rowwise_stats(dy)
    np.testing.assert_allclose(tapped, [expected["underflow"], expected["distortion"]])
    assert 0 < float(tapped[0]) < 1  # Some of the 8 decades flush to zero.
