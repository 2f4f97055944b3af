"""Running sweeps: processes, resumability, refusal of changed points, results and commands."""

from __future__ import annotations

import json
import math
import os

import pytest

from experiments import sweep as sweep_cli
from experiments.sweeps import analysis
from experiments.sweeps.results import collect, read_results, to_dataframe, write_results
from experiments.sweeps.runner import point_status, run_sweep, tpu_launch_commands
from experiments.sweeps.spec import Point, Sweep

SMOKE = "experiments/configs/smoke.py"
TWO_STEPS = {"train.num_steps": 2, "eval.every_steps": 2, "checkpoint.every_steps": 2}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """Two smoke points (2 steps each) trained by two processes at once."""
    root = str(tmp_path_factory.mktemp("sweep"))
    sweep = Sweep.grid("smoke", SMOKE, {"optim.peak_lr": [1e-3, 3e-3]}, base_overrides=TWO_STEPS)
    statuses = run_sweep(sweep, root, parallel=2, echo=False)
    return sweep, root, statuses


def test_points_run_in_their_own_workdirs_and_finish(finished_sweep):
    sweep, root, statuses = finished_sweep
    assert {s.state for s in statuses.values()} == {"done"}
    for point in sweep.points:
        workdir = os.path.join(root, point.name)
        assert os.path.exists(os.path.join(workdir, "metrics.jsonl"))
        assert os.path.exists(os.path.join(workdir, "run.log"))
    with open(os.path.join(root, "sweep.json")) as f:
        assert set(json.load(f)["points"]) == {p.name for p in sweep.points}


def test_rerun_skips_finished_points(finished_sweep, capsys):
    sweep, root, _ = finished_sweep
    before = {p.name: os.path.getsize(os.path.join(root, p.name, "run.log")) for p in sweep.points}
    run_sweep(sweep, root, echo=True)
    assert "$ python" not in capsys.readouterr().out
    after = {p.name: os.path.getsize(os.path.join(root, p.name, "run.log")) for p in sweep.points}
    assert after == before


def test_changed_point_definition_is_refused_before_running(finished_sweep):
    sweep, root, _ = finished_sweep
    name = sweep.points[0].name
    changed = Sweep("smoke", (Point(name, SMOKE, {**TWO_STEPS, "seed": 7}),))
    with pytest.raises(ValueError, match=f"already holds point.*{name}"):
        run_sweep(changed, root, echo=False)


def test_results_table_has_one_row_per_point(finished_sweep):
    sweep, root, _ = finished_sweep
    rows = collect(sweep, root)
    assert [r["name"] for r in rows] == [p.name for p in sweep.points]
    for row in rows:
        assert row["state"] == "done" and row["num_steps"] == 2 and row["last_step"] == 2
        assert math.isfinite(row["eval_loss"]) and row["eval_curve"] == {2: row["eval_loss"]}
        assert row["optim.peak_lr"] in (1e-3, 3e-3)
    csv_path, _ = write_results(rows, root)
    with open(csv_path) as f:
        assert f.readline().startswith("name,state,optim.peak_lr")
    reread = read_results(root)
    assert reread[0]["eval_curve"] == rows[0]["eval_curve"]
    frame = to_dataframe(reread)
    assert list(frame.index) == [p.name for p in sweep.points]


def test_interrupted_point_is_partial_and_pending_points_are_listed(tmp_path):
    sweep = Sweep.grid("s", SMOKE, {"seed": [0, 1]}, base_overrides=TWO_STEPS)
    workdir = tmp_path / sweep.points[0].name
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
    assert point_status(sweep.points[0], str(tmp_path)).state == "partial"
    assert point_status(sweep.points[1], str(tmp_path)).state == "pending"
    rows = collect(sweep, str(tmp_path))
    assert [r["state"] for r in rows] == ["partial", "pending"]
    assert all(math.isnan(r["eval_loss"]) for r in rows)
    assert analysis.finished(rows) == []


def test_failing_point_does_not_stop_the_others(tmp_path):
    config = tmp_path / "fails_in_the_run.py"
    config.write_text(
        "import os\n"
        "from experiments.configs import smoke\n"
        "def get_config(arg=''):\n"
        "    if os.environ.get('SWEEP_TEST_FAIL') and arg == 'bad':\n"
        "        raise RuntimeError('point bad failed on purpose')\n"
        "    cfg = smoke.get_config()\n"
        "    cfg.train.num_steps = 1\n"
        "    return cfg\n"
    )
    bad = Point("bad", f"{config}:bad")
    sweep = Sweep("s", (bad,))
    statuses = run_sweep(sweep, str(tmp_path / "root"), echo=False, env={"SWEEP_TEST_FAIL": "1"})
    assert statuses["bad"].state == "pending"
    log = (tmp_path / "root" / "bad" / "run.log").read_text()
    assert "point bad failed on purpose" in log


def test_cli_commands_and_tpu_commands(tmp_path, capsys):
    config = tmp_path / "sweep_cfg.py"
    config.write_text(
        "from experiments.sweeps.spec import Sweep\n"
        "def get_sweep():\n"
        f"    return Sweep.grid('My_Sweep', {SMOKE!r}, {{'seed': [0, 1]}})\n"
    )
    assert sweep_cli.main([f"--config={config}", "--root=gs://b/r", "--commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"python -m experiments.run --config={SMOKE} --workdir=gs://b/r/seed=0 --config.seed=0",
        f"python -m experiments.run --config={SMOKE} --workdir=gs://b/r/seed=1 --config.seed=1",
    ]
    sweep = Sweep.grid("My_Sweep", SMOKE, {"seed": [0]})
    (command,) = tpu_launch_commands(sweep, "gs://b/r", "--zone=z --accelerator=v5p-8")
    assert command == (
        "python -m launch.tpu all --name=my-sweep-seed-0 --zone=z --accelerator=v5p-8 "
        f"--config={SMOKE} --workdir=gs://b/r/seed=0 -- --config.seed=0"
    )
    assert sweep_cli.main([f"--config={tmp_path}/missing.py", "--root=x"]) == 2


def test_status_is_read_only(tmp_path, capsys):
    config = tmp_path / "sweep_cfg.py"
    config.write_text(
        "from experiments.sweeps.spec import Sweep\n"
        "def get_sweep():\n"
        f"    return Sweep.grid('s', {SMOKE!r}, {{'seed': [0, 1]}}, base_overrides={TWO_STEPS})\n"
    )
    root = tmp_path / "root"
    (root / "seed=0").mkdir(parents=True)
    (root / "seed=0" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
    (root / "results.csv").write_text("stored by the last run\n")
    before = sorted((p, p.read_bytes()) for p in root.rglob("*") if p.is_file())
    assert sweep_cli.main([f"--config={config}", f"--root={root}", "--status"]) == 0
    assert sorted((p, p.read_bytes()) for p in root.rglob("*") if p.is_file()) == before
    table = capsys.readouterr().out
    assert "seed=0  partial" in table and "seed=1  pending" in table
    assert sweep_cli.main([f"--config={config}", f"--root={tmp_path}/none", "--status"]) == 0
    assert not (tmp_path / "none").exists()
