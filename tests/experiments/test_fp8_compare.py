"""The BF16-vs-FP8 report's arithmetic on hand-made metric records."""

from __future__ import annotations

import pytest

from experiments.fp8_compare import relative_gaps, run_name, safeguard_table, seed_gap_summary


def test_relative_gaps_pair_the_steps_both_runs_logged():
    gaps = relative_gaps({10: 4.0, 20: 2.0, 30: 1.0}, {10: 4.01, 20: 1.99})
    assert list(gaps) == [10, 20]
    assert gaps[10] == pytest.approx(0.0025) and gaps[20] == pytest.approx(-0.005)


def test_safeguard_table_reads_the_last_probe_and_the_extremes():
    records = [
        {"step": 5, "train/loss": 3.0},
        {
            "step": 10,
            "fp8/underflow/max": 0.02,
            "fp8/distortion/min": 0.998,
            "fp8/underflow/layer_01/attn_qkv/input": 0.02,
        },
        {
            "step": 20,
            "fp8/underflow/max": 0.001,
            "fp8/distortion/min": 0.9995,
            "fp8/underflow/layer_01/attn_qkv/input": 0.001,
            "fp8/distortion/mtp/experts_down/grad": 0.9995,
        },
    ]
    step, table, extremes = safeguard_table(records)
    assert step == 20
    assert table == {
        ("layer_01", "attn_qkv"): {"underflow/input": 0.001},
        ("mtp", "experts_down"): {"distortion/grad": 0.9995},
    }
    assert extremes == {"max underflow": 0.02, "min distortion (cosine)": 0.998}
    assert safeguard_table(records[:1]) == (0, {}, {})


def test_seed_gap_summary_and_run_names():
    mean, stderr = seed_gap_summary([0.003, -0.001, 0.001])
    assert mean == pytest.approx(0.001)
    assert stderr == pytest.approx(0.002 / 3**0.5)  # Sample std 0.002 over sqrt(3).
    assert seed_gap_summary([0.0027]) == (pytest.approx(0.0027), 0.0)
    assert run_name("fp8", 0) == "fp8" and run_name("bf16_reordered", 2) == "bf16_reordered_seed2"
