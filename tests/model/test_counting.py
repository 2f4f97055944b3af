"""Tests for parameter and FLOP accounting against the published Ling 2.0 figures (SPEC 1, 2)."""

from __future__ import annotations

import pytest

from ling_jax.configs.presets import get_preset
from ling_jax.model import counting, param_table

# Exact integers of the SPEC section 2 formula, which reproduce the published figures
# (SPEC section 2 table: totals 16.256B / 102.890B / 999.705B, active non-embedding
# 0.789B / 4.865B / 48.479B, active incl. embeddings 1.433B / 6.152B / 51.054B).
PUBLISHED = {
    "ling_mini_2": dict(
        total=16_255_638_528, active=1_432_968_192, active_non_embedding=789_142_528
    ),
    "ling_flash_2": dict(
        total=102_889_697_280, active=6_152_269_824, active_non_embedding=4_864_618_496
    ),
    "ling_1t": dict(
        total=999_705_309_184, active=51_054_407_680, active_non_embedding=48_479_105_024
    ),
}
PUBLISHED_BILLIONS = {  # (total, active non-embedding, active), as printed in SPEC section 2.
    "ling_mini_2": (16.256, 0.789, 1.433),
    "ling_flash_2": (102.890, 4.865, 6.152),
    "ling_1t": (999.705, 48.479, 51.054),
}
SPEC_M = {"ling_mini_2": 6.75e9, "ling_flash_2": 3.56e10, "ling_1t": 3.23e11}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes_exact(name):
    count = counting.count_params(get_preset(name), include_mtp=False)
    got = {k: getattr(count, k) for k in PUBLISHED[name]}
    assert got == PUBLISHED[name]
    total, active_non_emb, active = PUBLISHED_BILLIONS[name]
    assert round(count.total / 1e9, 3) == total
    assert round(count.active_non_embedding / 1e9, 3) == active_non_emb
    assert round(count.active / 1e9, 3) == active
    assert count.expert_bias == counting.num_moe_layers(get_preset(name)) * 256


def test_flash_matches_safetensors_count():
    # SPEC S11: 102,889,697,280 bf16 + 7,936 fp32 (31 MoE layers x 256 experts).
    count = counting.count_params(get_preset("ling_flash_2"), include_mtp=False)
    assert count.total == 102_889_697_280
    assert count.expert_bias == 7_936


def test_1t_needs_four_dense_layers():
    cfg = get_preset("ling_1t")
    cfg.first_k_dense_replace = 1
    assert round(counting.count_params(cfg, include_mtp=False).total / 1e9, 1) == 1037.2


@pytest.mark.parametrize("name", ["ling_mini_2", "ling_flash_2", "ling_1t", "tiny"])
def test_by_module_sums_and_order(name):
    count = counting.count_params(get_preset(name))
    assert tuple(count.by_module) == counting.MODULES
    assert sum(t for t, _ in count.by_module.values()) == count.total
    assert sum(a for _, a in count.by_module.values()) == count.active
    for total, active in count.by_module.values():
        assert 0 <= active <= total


def test_tiny_by_module_by_hand():
    # tiny: V=256, d=64, L=3 (1 dense), n_h=4, n_kv=2, head_dim=16, d_ffn=128, E=16, top-k=4,
    # 1 shared expert, d_e=32, one MTP layer.
    count = counting.count_params(get_preset("tiny"))
    attention = 64 * (4 + 4) * 16 + 4 * 16 * 64 + 2 * 16
    expert = 3 * 64 * 32
    moe_total, moe_active = 64 * 16 + 17 * expert, 64 * 16 + 5 * expert
    mtp_dense = 5 * 64 + 2 * 64 * 64 + attention
    assert count.by_module == {
        "embedding": (256 * 64, 256 * 64),
        "attention": (3 * attention, 3 * attention),
        "norms": (7 * 64, 7 * 64),
        "dense_mlp": (3 * 64 * 128, 3 * 64 * 128),
        "router": (2 * 64 * 16, 2 * 64 * 16),
        "routed_experts": (2 * 16 * expert, 2 * 4 * expert),
        "shared_experts": (2 * expert, 2 * expert),
        "lm_head": (64 * 256, 64 * 256),
        "mtp": (mtp_dense + moe_total, mtp_dense + moe_active),
    }
    assert count.expert_bias == 3 * 16
    assert count.active_non_embedding == count.active - 2 * 256 * 64


def test_mtp_switch():
    with_mtp = counting.count_params(get_preset("tiny"))
    without = counting.count_params(get_preset("tiny"), include_mtp=False)
    no_mtp_preset = counting.count_params(get_preset("tiny_no_mtp"))
    assert without == no_mtp_preset
    assert without.by_module["mtp"] == (0, 0) and not without.include_mtp
    assert with_mtp.total - without.total == with_mtp.by_module["mtp"][0] > 0
    assert with_mtp.expert_bias - without.expert_bias == 16


def test_no_expert_bias_and_no_qk_norm():
    cfg = get_preset("tiny")
    cfg.moe.use_expert_bias = False
    cfg.attention.use_qk_norm = False
    count = counting.count_params(cfg)
    assert count.expert_bias == 0
    assert count.by_module["attention"][0] == 3 * (64 * 8 * 16 + 4 * 16 * 64)


def test_ratios():
    cfg = get_preset("ling_flash_2")
    assert round(counting.activation_ratio(cfg), 4) == 0.0350
    assert counting.granularity(cfg) == 8


@pytest.mark.parametrize("name", sorted(SPEC_M))
def test_scaling_law_m_matches_spec(name):
    m = counting.non_embedding_flops_per_token(get_preset(name), 4096)
    assert m == pytest.approx(SPEC_M[name], rel=0.01)


def test_flops_convention():
    cfg = get_preset("ling_flash_2")
    fwd = counting.flops_per_token(cfg, 4096, include_mtp=False, training=False)
    train = counting.flops_per_token(cfg, 4096, include_mtp=False, training=True)
    assert train.total == 3 * fwd.total and train.mtp == 0
    assert train.total == train.matmul + train.attention + train.lm_head
    # Forward attention: 2 * 2 * s * n_h * head_dim per layer; causal halves it.
    assert fwd.attention == 32 * 4 * 4096 * 32 * 128
    causal = counting.flops_per_token(cfg, 4096, include_mtp=False, training=False, causal=True)
    assert causal.attention * 2 == fwd.attention
    assert fwd.lm_head == 2 * 4096 * 157184
    # Matmul params = active non-embedding minus norm weights (2 per layer + final + q/k-norm).
    count = counting.count_params(cfg, include_mtp=False)
    norms = count.by_module["norms"][0] + 32 * 2 * 128
    assert fwd.matmul == 2 * (count.active_non_embedding - norms)
    # Training FLOPs without head agree with the scaling-law M up to the norm weights.
    m = counting.non_embedding_flops_per_token(cfg, 4096)
    assert train.matmul + train.attention == m - 6 * norms


def test_flops_mtp():
    cfg = get_preset("tiny")
    with_mtp = counting.flops_per_token(cfg, 64, training=False)
    without = counting.flops_per_token(cfg, 64, include_mtp=False, training=False)
    mtp_params = counting.count_params(cfg).by_module["mtp"][1] - 5 * 64 - 2 * 16
    assert with_mtp.mtp == 2 * mtp_params + 4 * 64 * 4 * 16 + 2 * 64 * 256
    assert with_mtp.total - without.total == with_mtp.mtp


def test_flops_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        counting.flops_per_token(get_preset("tiny"), 0)


def test_param_table_prints_total(capsys):
    assert param_table.main(["--preset=ling_flash_2", "--no-mtp", "--seq_len=4096"]) == 0
    out = capsys.readouterr().out
    assert "102,889,697,280" in out and "6,152,269,824" in out and "4,864,618,496" in out
    assert "7,936" in out
    for module in counting.MODULES:
        assert module in out


def test_param_table_tiny_with_mtp(capsys):
    param_table.main(["--preset=tiny"])
    total = counting.count_params(get_preset("tiny")).total
    assert f"{total:,}" in capsys.readouterr().out


def test_param_table_bad_preset(capsys):
    with pytest.raises(SystemExit):
        param_table.main(["--preset=ling_huge"])
    err = capsys.readouterr().err
    assert "ling_huge" in err and "ling_flash_2" in err and "tiny" in err
