"""The step-time arithmetic: layer counts, bandwidths, overlap bounds and the implied MFU."""

from __future__ import annotations

import pytest

from ling_jax.parallel.step_model import LayerCost, estimate_step, interconnect

PEAK = 459e12  # v5p


def test_counts_multiply_per_layer_costs():
    layers = [
        LayerCost("dense", count=4, flops=2 * PEAK, ici_bytes=0.0),  # 8 s of compute
        LayerCost("moe", count=76, flops=PEAK, ici_bytes=6e9),  # 76 s; 76 x 6e9 / 600e9
        LayerCost("mtp", count=1, flops=PEAK, ici_bytes=0.0),  # 1 s
    ]
    est = estimate_step(
        layers, generation="v5p", peak_flops=PEAK, chips=2, model_flops=0.5 * 85 * 2 * PEAK
    )
    assert est.compute_seconds == pytest.approx(85.0)
    assert est.ici_seconds == pytest.approx(76 * 6e9 / 600e9)  # one-way = 1200 / 2 GB/s
    assert est.dcn_seconds == 0.0
    assert est.serial_seconds == pytest.approx(85.0 + 0.76)
    assert est.overlapped_seconds == pytest.approx(85.0)
    assert est.mfu_overlapped == pytest.approx(0.5)  # half the executed FLOPs are model FLOPs
    assert est.mfu_serial == pytest.approx(0.5 * 85.0 / 85.76)


def test_communication_bound_step_and_dcn():
    layers = [LayerCost("moe", count=10, flops=0.1 * PEAK, ici_bytes=0.0, dcn_bytes=6.25e9)]
    est = estimate_step(layers, generation="v5p", peak_flops=PEAK, chips=1, model_flops=PEAK)
    assert est.dcn_seconds == pytest.approx(10.0)  # 50 Gbps = 6.25e9 B/s per chip
    assert est.overlapped_seconds == pytest.approx(10.0)
    assert est.mfu_overlapped == pytest.approx(0.1)


def test_unknown_figures_are_refused():
    with pytest.raises(ValueError, match="no interconnect figures for TPU 'v4'"):
        interconnect("v4")
    cross_slice = [LayerCost("moe", count=1, flops=1.0, ici_bytes=0.0, dcn_bytes=1.0)]
    with pytest.raises(ValueError, match="v6e has no DCN figure"):
        estimate_step(cross_slice, generation="v6e", peak_flops=1.0, chips=1, model_flops=1.0)
    with pytest.raises(ValueError, match="negative cost"):
        estimate_step(
            [LayerCost("moe", count=1, flops=-1.0, ici_bytes=0.0)],
            generation="v5p",
            peak_flops=1.0,
            chips=1,
            model_flops=1.0,
        )
