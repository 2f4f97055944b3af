"""Tests for wind-tunnel planning: valid configs whose counted FLOPs follow the laws."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from ling_jax.configs import get_preset, validate_model_config
from ling_jax.model import LingForCausalLM, counting
from ling_jax.scaling import laws, planner

BUDGETS = (1e18, 1e19, 1e20, 1e21, 1e22)
CPU_BUDGETS = (1e13, 1e14, 1e15, 1e16)


@pytest.fixture(scope="module")
def ladder():
    return [planner.plan(c) for c in BUDGETS]


@pytest.fixture(scope="module")
def cpu_ladder():
    return [planner.plan_cpu(c) for c in CPU_BUDGETS]


def _check_plan(p: planner.Plan, tolerance: float = 0.1, fixed_tokens: bool = False) -> None:
    validate_model_config(p.config)
    assert p.flops_per_token == counting.non_embedding_flops_per_token(p.config, p.seq_len)
    assert abs(p.flops_per_token_error) <= tolerance
    assert p.params == counting.count_params(p.config)
    assert p.learning_rate == pytest.approx(laws.optimal_lr(p.compute))
    assert p.batch_size == max(1, round(laws.optimal_batch_tokens(p.compute) / p.seq_len))
    assert p.tokens == p.train_steps * p.batch_size * p.seq_len
    if fixed_tokens:
        return
    # D = C / M up to rounding to whole batches.
    assert p.realized_compute == pytest.approx(p.compute, rel=0.01)


def test_ladder_is_valid_and_follows_m_opt(ladder):
    for p, compute in zip(ladder, BUDGETS, strict=True):
        _check_plan(p)
        assert p.target_flops_per_token == pytest.approx(
            laws.optimal_model_flops_per_token(compute)
        )
        assert p.tokens == pytest.approx(laws.optimal_tokens(compute), rel=0.1)
        assert p.activation_ratio == pytest.approx(9 / 257, rel=0.05)
        assert p.granularity == pytest.approx(8, rel=0.1)
        if p.config.hidden_size >= 1024:
            assert p.config.head_dim == 128
        assert p.config.mtp.num_layers == 1


def test_ladder_is_monotone(ladder):
    for field in ("flops_per_token", "tokens", "batch_size"):
        values = [getattr(p, field) for p in ladder]
        assert values == sorted(values) and len(set(values)) == len(values), field
    assert np.all(np.diff([p.params.total for p in ladder]) > 0)
    assert np.all(np.diff([p.config.hidden_size for p in ladder]) >= 0)
    assert np.all(np.diff([p.learning_rate for p in ladder]) < 0)


def test_fixed_tokens_reproduce_ling_mini_and_flash():
    # At its 20T-token compute, Ling-mini-2.0's M_opt target C / D = 6.8e9 gives its shape.
    for name, compute in (("ling_mini_2", 1.36e23), ("ling_flash_2", 7.1e23)):
        p = planner.plan(compute, tokens=20e12)
        _check_plan(p, tolerance=0.02, fixed_tokens=True)
        ref = get_preset(name)
        for field in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads"):
            assert p.config[field] == ref[field], field
        for field in ("num_experts", "num_experts_per_tok", "expert_intermediate_size"):
            assert p.config.moe[field] == ref.moe[field], field
        assert p.config.first_k_dense_replace == ref.first_k_dense_replace
        assert p.tokens == pytest.approx(20e12, rel=1e-3)
    assert f"{planner.plan(1.36e23, tokens=20e12).learning_rate:.2e}" == "3.36e-04"


def test_compute_optimal_plan_at_ling_mini_compute():
    # Compute-optimal allocation of Ling-mini's budget is a much larger model on far fewer
    # tokens: M_opt(1.36e23) = 1.17e11 (17x mini's M), D_opt = 1.16T tokens.
    p = planner.plan(1.36e23)
    _check_plan(p, tolerance=0.05)
    assert p.flops_per_token == pytest.approx(1.17e11, rel=0.05)
    assert p.tokens == pytest.approx(1.16e12, rel=0.05)
    assert p.efficiency_leverage == pytest.approx(8.8, abs=0.05)


def test_dense_plans():
    for compute in (1e18, 1e22):
        p = planner.plan(compute, arch="dense")
        _check_plan(p)
        assert p.config.first_k_dense_replace == p.config.num_layers
        assert p.config.mtp.num_layers == 0
        assert p.params.active == p.params.total
        assert p.efficiency_leverage == 1.0
    # Near the paper's Dense-6.1B shape at 1e22 FLOPs (d = 4096, d_ffn = 14336).
    assert p.config.hidden_size == 4096
    assert p.config.intermediate_size == 14336


def test_dense_fraction_rule():
    assert [planner.dense_layers(n, "moe") for n in (1, 2, 20, 32, 60, 80)] == [0, 1, 1, 1, 3, 4]
    assert planner.dense_layers(12, "moe", dense_fraction=0.0) == 0
    assert planner.dense_layers(12, "dense") == 12


def test_granularity_and_activation_are_followed():
    p = planner.plan(1e21, activation_ratio=0.031, granularity=12)
    _check_plan(p)
    assert p.activation_ratio == pytest.approx(0.031, rel=0.1)
    assert p.granularity == pytest.approx(12, rel=0.1)


def test_cpu_plans(cpu_ladder):
    for p in cpu_ladder:
        _check_plan(p)
        cfg = p.config
        assert cfg.vocab_size == 512 and p.seq_len == 256
        assert cfg.max_position_embeddings == 256 and cfg.dtype == "float32"
        assert cfg.head_dim <= 32
    assert np.all(np.diff([p.flops_per_token for p in cpu_ladder]) > 0)


def test_cpu_plan_builds_the_model_it_counts(cpu_ladder):
    cfg = cpu_ladder[0].config
    model = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert params == cpu_ladder[0].params.total


def test_rejects_bad_requests():
    with pytest.raises(ValueError, match="activation_ratio"):
        planner.plan(1e20, activation_ratio=1.5)
    with pytest.raises(ValueError, match="too small"):
        planner.plan(1e9)
    with pytest.raises(ValueError, match="mtp"):
        planner.plan(1e20, arch="dense", mtp=True)


def test_plan_shape_keeps_the_given_shape_and_takes_the_laws_tokens():
    overrides = planner.cpu_overrides(256)
    kwargs = dict(head_dim=32, seq_len=256, vocab_size=2048, config_overrides=overrides)
    full = planner.plan_shape(128, 3, activation_ratio=1 / 8, granularity=4.0, **kwargs)
    cfg = full.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads) == (128, 3, 4)
    assert cfg.moe.expert_intermediate_size == 64 and cfg.moe.num_experts == 32
    optimal = laws.compute_for_flops_per_token(full.flops_per_token)
    assert full.tokens == pytest.approx(laws.optimal_tokens(optimal), rel=0.02)
    assert full.learning_rate == pytest.approx(laws.optimal_lr(full.compute))
    scaled = planner.plan_shape(
        128, 3, activation_ratio=1 / 8, granularity=4.0, token_scale=0.1, **kwargs
    )
    assert scaled.tokens == pytest.approx(0.1 * full.tokens, rel=0.02)
    assert scaled.compute == pytest.approx(scaled.flops_per_token * scaled.tokens, rel=0.02)
    dense = planner.plan_shape(128, 3, arch="dense", **kwargs)
    assert dense.config.first_k_dense_replace == 3 and dense.efficiency_leverage == 1.0
    with pytest.raises(ValueError, match="not a multiple of head_dim"):
        planner.plan_shape(100, 2, **kwargs)
    with pytest.raises(ValueError, match="token_scale"):
        planner.plan_shape(128, 2, token_scale=0.0, **kwargs)


def test_width_scaled_init_std_is_lings_at_2048_and_scales_as_inverse_sqrt_width():
    assert planner.width_scaled_init_std(2048) == pytest.approx(0.006)
    assert planner.width_scaled_init_std(512) == pytest.approx(0.012)
    assert planner.width_scaled_init_std(64, reference_std=0.01, reference_width=256) == 0.02
    with pytest.raises(ValueError, match="d_model"):
        planner.width_scaled_init_std(0)
