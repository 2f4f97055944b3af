"""Sweep descriptions: grids, points, commands, config loading and their errors."""

from __future__ import annotations

import shlex

import pytest

from experiments.sweeps.spec import Point, Sweep, load_config_file, load_sweep, render_value

SMOKE = "experiments/configs/smoke.py"


def test_grid_is_the_cartesian_product_with_named_tagged_points():
    sweep = Sweep.grid("lr", SMOKE, {"optim.peak_lr": [1e-3, 3e-3], "seed": [0, 1]})
    assert [p.name for p in sweep.points] == [
        "peak_lr=0.001,seed=0",
        "peak_lr=0.001,seed=1",
        "peak_lr=0.003,seed=0",
        "peak_lr=0.003,seed=1",
    ]
    assert sweep.points[1].tags == {"optim.peak_lr": 1e-3, "seed": 1}
    assert sweep.points[1].overrides == {"optim.peak_lr": 1e-3, "seed": 1}


def test_point_command_is_an_experiments_run_command_with_overrides():
    point = Point(
        "a", SMOKE, {"optim.peak_lr": 0.002, "model.scan_layers": False, "data.source": "embedded"}
    )
    args = shlex.split(point.command("/runs/s"))
    assert args[:3] == ["python", "-m", "experiments.run"]
    assert args[3:] == [
        f"--config={SMOKE}",
        "--workdir=/runs/s/a",
        "--config.optim.peak_lr=0.002",
        "--config.model.scan_layers=False",
        "--config.data.source=embedded",
    ]


def test_point_config_applies_overrides_and_validates():
    cfg = Point("a", SMOKE, {"optim.peak_lr": 0.002, "train.num_steps": 3}).experiment_config()
    assert cfg.optim.peak_lr == 0.002 and cfg.train.num_steps == 3
    with pytest.raises(ValueError, match=r"point 'b'.*unknown config field 'optim.nope'"):
        Point("b", SMOKE, {"optim.nope": 1}).experiment_config()
    with pytest.raises(ValueError, match=r"point 'c'.*optim.peak_lr"):
        Point("c", SMOKE, {"optim.peak_lr": -1.0}).experiment_config()


def test_bad_sweeps_are_refused_with_names():
    with pytest.raises(ValueError, match="duplicate point names"):
        Sweep("s", (Point("a", SMOKE), Point("a", SMOKE)))
    with pytest.raises(ValueError, match="point name 'a/b'"):
        Point("a/b", SMOKE)
    with pytest.raises(ValueError, match="no points"):
        Sweep("s", ())
    with pytest.raises(ValueError, match="at least one value"):
        Sweep.grid("s", SMOKE, {"seed": []})
    with pytest.raises(TypeError, match="command line"):
        render_value({"a": 1})
    with pytest.raises(ValueError, match="no point"):
        Sweep("s", (Point("a", SMOKE),)).select(["b"])


def test_config_files_load_like_config_flags(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config_file("nope.py")
    path = tmp_path / "c.py"
    path.write_text("def get_config(arg='x'):\n    return arg\n\ndef get_sweep():\n    return 1\n")
    assert load_config_file(str(path)) == "x"
    assert load_config_file(f"{path}:y") == "y"
    with pytest.raises(ValueError, match="returned int, expected a Sweep"):
        load_sweep(str(path))
    with pytest.raises(ValueError, match="no get_sweep"):
        load_sweep(SMOKE)


def test_assignments_parse_literals_and_apply_to_every_point():
    from experiments.sweeps.spec import parse_assignment

    assert parse_assignment("optim.peak_lr=1e-3") == ("optim.peak_lr", 1e-3)
    assert parse_assignment("model.scan_layers=False") == ("model.scan_layers", False)
    assert parse_assignment("data.train_files=gs://b/*.txt") == ("data.train_files", "gs://b/*.txt")
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_assignment("seed")
    sweep = Sweep.grid("s", SMOKE, {"seed": [0, 1]}).with_overrides({"train.num_steps": 3})
    assert [p.overrides for p in sweep.points] == [
        {"seed": 0, "train.num_steps": 3},
        {"seed": 1, "train.num_steps": 3},
    ]
    assert sweep.points[0].experiment_config().train.num_steps == 3


def test_each_point_loads_its_config_once_for_validation_status_and_results(tmp_path, monkeypatch):
    from experiments.sweeps import results, spec

    loads = []
    real = spec.load_config_file
    monkeypatch.setattr(spec, "load_config_file", lambda s: loads.append(s) or real(s))
    sweep = Sweep.grid("once", SMOKE, {"seed": [0, 1]}, base_overrides={"train.num_steps": 3})
    assert sweep.num_steps() == {"seed=0": 3, "seed=1": 3}
    rows = results.collect(sweep, str(tmp_path))  # status of every point: pending
    assert [r["state"] for r in rows] == ["pending", "pending"]
    assert loads == [SMOKE, SMOKE]
