"""Wind-tunnel ladders, their configs, and the fits, predictions and plots of their results."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest

from experiments import wind_tunnel
from experiments.configs import wind_tunnel_micro as micro
from experiments.sweeps import analysis
from experiments.sweeps.spec import load_config_file, load_sweep
from ling_jax.scaling import laws

MICRO = "experiments/configs/wind_tunnel_micro.py"
LEVERAGE = "experiments/configs/efficiency_leverage_micro.py"
POD = "experiments/configs/wind_tunnel_pod.py"
EXAMPLE = os.path.join(os.path.dirname(wind_tunnel.__file__), "notebooks", "wind_tunnel_example")


def test_micro_ladder_follows_the_laws_between_rungs():
    sweep = load_sweep(MICRO)
    tags = [p.tags for p in sweep.points]
    assert [t["rung"] for t in tags] == ["xs", "s", "m", "l", "xl"]
    compute = np.array([t["compute"] for t in tags])
    assert np.all(np.diff(compute) > 0) and 10 < compute[-1] / compute[0] < 100
    # D grows as the law's D_opt between rungs: D ~ C_opt(M)^0.49 at a fixed token scale.
    optimal = [laws.compute_for_flops_per_token(t["flops_per_token"]) for t in tags]
    d_opt = np.array([laws.optimal_tokens(c) for c in optimal])
    ratio = np.array([t["tokens"] for t in tags]) / d_opt
    np.testing.assert_allclose(ratio, micro.TOKEN_SCALE, rtol=0.02)
    for point in sweep.points:
        cfg = point.experiment_config()
        assert cfg.model.moe.num_experts == 32 and cfg.model.moe.num_experts_per_tok == 4
        assert cfg.eval.max_batches == 0  # every rung sees the same validation tokens
        assert cfg.schedule.type == "wsd" and cfg.schedule.total_steps == cfg.train.num_steps
        assert cfg.optim.peak_lr == pytest.approx(point.tags["learning_rate"])
        lr = micro.LR_SCALE * laws.optimal_lr(point.tags["compute"])
        assert cfg.optim.peak_lr == pytest.approx(lr, rel=0.02)
        # Ling's 0.006 at d = 2048, scaled as 1 / sqrt(d): ~0.034 at d = 64.
        d_model = cfg.model.hidden_size
        assert cfg.model.init_std == pytest.approx(0.006 * math.sqrt(2048 / d_model))
        assert cfg.model.num_kv_heads == cfg.model.num_attention_heads


def test_leverage_families_share_shapes_and_overlap_in_compute():
    sweep = load_sweep(LEVERAGE)
    moe = [p.tags for p in sweep.points if p.tags["arch"] == "moe"]
    dense = [p.tags for p in sweep.points if p.tags["arch"] == "dense"]
    assert len(moe) == len(dense) == 3
    assert {round(t["activation_ratio"], 4) for t in moe} == {round(2 / 65, 4)}
    assert {t["granularity"] for t in moe} == {2.0}
    assert {t["activation_ratio"] for t in dense} == {1.0}
    assert max(t["compute"] for t in moe) > min(t["compute"] for t in dense)
    cfg = load_config_file(f"{LEVERAGE}:dense_2")
    assert cfg.model.first_k_dense_replace == cfg.model.num_layers


def test_pod_ladder_spans_half_a_billion_to_eight_billion_parameters():
    sweep = load_sweep(POD)
    params = [p.tags["params"] for p in sweep.points]
    assert 0.4e9 < params[0] < 0.7e9 and 6e9 < params[-1] < 10e9
    assert all(b / a > 1.5 for a, b in zip(params, params[1:], strict=False))
    cfg = load_config_file(f"{POD}:c2")
    assert cfg.model.moe.num_experts == 256 and cfg.data.seq_len == 4096
    assert cfg.model.vocab_size == 157184 and cfg.model.remat == "full"
    with pytest.raises(ValueError, match="data.train_files"):
        sweep.points[0].experiment_config()
    point = sweep.with_overrides({"data.train_files": "gs://bucket/*.txt"}).points[0]
    assert point.experiment_config().data.train_files == "gs://bucket/*.txt"


def _rows(name_prefix, compute, loss, **tags):
    return [
        {"name": f"{name_prefix}{i}", "state": "done", "compute": c, "eval_loss": value, **tags}
        for i, (c, value) in enumerate(zip(compute, loss, strict=True))
    ]


def test_prediction_of_the_largest_run_from_an_exact_power_law():
    compute = np.geomspace(1e12, 1e14, 5)
    loss = 30.0 * compute**-0.07 * (1 + 0.002 * np.array([1, -1, 1, -1, 0]))
    rows = _rows("r", compute, loss)
    rows.append({"name": "unfinished", "state": "partial", "compute": 1e15, "eval_loss": math.nan})
    prediction = analysis.predict_largest(rows)
    assert prediction.fit_names == ["r0", "r1", "r2", "r3"] and prediction.target_name == "r4"
    assert prediction.fit.b == pytest.approx(0.07, abs=0.005)
    assert abs(prediction.error) < 0.02
    assert prediction.lower < prediction.predicted < prediction.upper
    assert "measured" in prediction.describe()
    with pytest.raises(ValueError, match="needs finished runs at >= 4 computes"):
        analysis.predict_largest(rows[:3])


def test_irreducible_fit_predicts_a_bending_ladder_that_a_power_law_misses():
    compute = np.geomspace(6e11, 1e13, 5)
    loss = 6e7 * compute**-0.69 + 3.2  # 3.65 to 3.25: the log-log slope falls rung by rung
    saturating = analysis.predict_largest(_rows("r", compute, loss), irreducible=True)
    power_law = analysis.predict_largest(_rows("r", compute, loss))
    assert saturating.fit.c == pytest.approx(3.2, rel=1e-3)
    assert abs(saturating.error) < 1e-4 < 0.01 < abs(power_law.error)


def test_seeded_ladder_fits_the_seed_means_and_predicts_the_target_mean():
    compute = np.geomspace(1e12, 1e14, 5)
    law = 30.0 * compute**-0.07
    # Two seeds per rung, +-3% apart: their means lie exactly on the law.
    rows = _rows("a", compute, law * 1.03, rung="r") + _rows("b", compute, law * 0.97, rung="r")
    prediction = analysis.predict_largest(rows)
    assert sorted(prediction.fit_names) == ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"]
    assert prediction.measured_runs == pytest.approx([law[-1] * 1.03, law[-1] * 0.97])
    assert prediction.measured == pytest.approx(law[-1])
    assert prediction.fit.b == pytest.approx(0.07, abs=1e-3)
    assert abs(prediction.error) < 1e-3 * law[-1]
    assert "mean of 2 seeds" in prediction.describe()
    # A mean of two measurements gets a narrower prediction interval than one would.
    one = prediction.fit.predict(compute[-1], observation_noise=True)
    assert prediction.upper - prediction.lower < float(one.upper - one.lower)
    with pytest.raises(ValueError, match="needs finished runs at >= 4 computes"):
        analysis.predict_largest([r for r in rows if r["compute"] <= compute[2]])


def test_ladder_seeds_become_points_with_their_own_init_and_data_order():
    ladder = micro.ladder()
    seeded = dataclasses.replace(ladder, seeds=(0, 1))
    sweep = seeded.sweep("t", MICRO)
    assert [p.name for p in sweep.points][:4] == ["xs", "xs_seed1", "s", "s_seed1"]
    first, second = sweep.points[:2]
    assert first.overrides == {} and first.tags["seed"] == 0
    assert second.overrides == {"seed": 1, "data.shuffle_seed": 1}
    assert second.tags["seed"] == 1 and second.tags["compute"] == first.tags["compute"]
    for bad in ((), (0, 0), (-1,), (1.5,)):
        with pytest.raises(ValueError, match="ladder seeds"):
            dataclasses.replace(ladder, seeds=bad)


def test_measured_leverage_matches_a_known_compute_ratio():
    compute = np.geomspace(1e11, 1e13, 4)
    dense = _rows(
        "d",
        compute,
        40.0 * compute**-0.08 * (1 + 1e-3 * np.array([1, -1, -1, 1])),
        arch="dense",
        activation_ratio=1.0,
        granularity=math.nan,
    )
    # MoE reaches the dense loss with 3x less compute: L_moe(C) = L_dense(3 C).
    moe = _rows(
        "m",
        compute,
        40.0 * (3 * compute) ** -0.08 * (1 + 1e-3 * np.array([-1, 1, 1, -1])),
        arch="moe",
        activation_ratio=0.03,
        granularity=2.0,
    )
    measured = analysis.measure_leverage(moe, dense)
    np.testing.assert_allclose(measured.leverage.value, 3.0, rtol=0.1)
    np.testing.assert_allclose(
        measured.predicted, laws.efficiency_leverage(0.03, 2.0, compute), rtol=1e-9
    )
    assert "law" in measured.describe()


def test_analysis_writes_plots_and_report(tmp_path, monkeypatch):
    compute = np.geomspace(1e12, 1e14, 5)
    ladder = _rows(
        "l", compute, 30.0 * compute**-0.07, arch="moe", activation_ratio=0.12, granularity=4.0
    )
    small = np.geomspace(3e11, 4e12, 3)
    leverage = _rows(
        "moe_",
        small,
        29.0 * small**-0.07 * np.array([1.001, 0.999, 1.0]),
        arch="moe",
        activation_ratio=0.03,
        granularity=2.0,
    )
    leverage += _rows(
        "dense_",
        small * 1.5,
        31.0 * (small * 1.5) ** -0.07 * np.array([0.999, 1.001, 1.0]),
        arch="dense",
        activation_ratio=1.0,
        granularity=math.nan,
    )
    drawn = {}
    plot = analysis.plot_loss_vs_compute
    monkeypatch.setattr(
        analysis, "plot_loss_vs_compute", lambda *a, **k: drawn.update(k) or plot(*a, **k)
    )
    report = wind_tunnel.analyze(ladder, leverage, str(tmp_path))
    # The ladder's curve is the fit that made the prediction (four rungs, irreducible term).
    assert drawn["fits"]["ladder MoE (A=12.0%)"] is drawn["prediction"].fit
    assert drawn["prediction"].fit.irreducible
    assert abs(report["prediction"]["error"]) < 1e-6
    assert abs(report["prediction_power_law"]["error"]) < 1e-6
    assert report["prediction"]["c"] < 0.01 and report["prediction_power_law"]["c"] == 0
    assert set(report["leverage"]) == {"MoE (A=3.0%)", "ladder MoE (A=12.0%)"}
    for key in ("loss_plot", "leverage_plot"):
        with open(report[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report.json").exists()


def _tree(root) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its bytes."""
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_analyze_only_reads_stored_results_and_rewrites_none(tmp_path, capsys):
    root = tmp_path / "wt"
    shutil.copytree(EXAMPLE, root)
    before = _tree(root)
    assert wind_tunnel.main([f"--root={root}", "--analyze_only"]) == 0
    after = _tree(root)
    assert {k: after[k] for k in before} == before  # The stored results are untouched.
    report = json.loads(after["report.json"])
    assert math.isfinite(report["prediction"]["measured"]) and report["leverage"]
    assert "results.json" in capsys.readouterr().out


def test_analyze_only_refuses_unfinished_runs_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "wt"
    shutil.copytree(EXAMPLE, root)
    (root / "ladder" / "m").mkdir()  # A run of the ladder that stopped at step 1.
    (root / "ladder" / "m" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
    before = _tree(root)
    assert wind_tunnel.main([f"--root={root}", "--analyze_only"]) == 1
    assert _tree(root) == before
    err = capsys.readouterr().err
    assert "m (partial)" in err and "xs (pending)" in err and "drop --analyze_only" in err
    empty = tmp_path / "empty"
    assert wind_tunnel.main([f"--root={empty}", "--analyze_only"]) == 1
    assert not empty.exists()
