"""Running a sweep on this machine (sequentially or several processes at once), resumably.

Each point runs `python -m experiments.run` in its own process with its workdir at
`<root>/<point>`; its output goes to `<root>/<point>/run.log`. A point is done when its
`metrics.jsonl` holds the validation loss at the config's last step; rerunning the sweep skips
done points and resumes interrupted ones from their latest snapshot (experiments.run resumes).

`<root>/sweep.json` records each point's definition. A rerun whose point of the same name has a
different config or overrides is refused before anything runs, so no finished run is silently
mixed with a changed one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping

from experiments.sweeps.spec import REPO, Point, Sweep
from launch.steps import MAX_NAME
from ling_jax.io import paths
from ling_jax.train.metrics import METRICS_FILE, read_metrics

MANIFEST = "sweep.json"
LOG_FILE = "run.log"


@dataclasses.dataclass(frozen=True)
class PointStatus:
    """Where one point stands: "done", "partial" (has metrics, not finished) or "pending"."""

    name: str
    state: str
    num_steps: int
    last_step: int | None


def point_status(point: Point, root: str, num_steps: int | None = None) -> PointStatus:
    """Reads `<root>/<point>/metrics.jsonl`; `num_steps` defaults to the point's config."""
    if num_steps is None:
        num_steps = point.num_steps
    path = paths.join(root, point.name, METRICS_FILE)
    if not paths.exists(path):
        return PointStatus(point.name, "pending", num_steps, None)
    records = read_metrics(paths.join(root, point.name))
    last = max((r["step"] for r in records), default=None)
    done = any(r["step"] == num_steps and "eval/loss" in r for r in records)
    return PointStatus(point.name, "done" if done else "partial", num_steps, last)


def check_manifest(sweep: Sweep, root: str) -> None:
    """Refuses points whose recorded definition differs; records the new ones."""
    path = paths.join(root, MANIFEST)
    recorded: dict = {}
    if paths.exists(path):
        try:
            recorded = json.loads(paths.read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from e
    points = recorded.setdefault("points", {})
    changed = [
        p.name for p in sweep.points if p.name in points and points[p.name] != p.definition()
    ]
    if changed:
        detail = "; ".join(
            f"{n}: recorded {points[n]}, now {sweep.point(n).definition()}" for n in changed
        )
        raise ValueError(
            f"sweep root {root} already holds point(s) {changed} with another definition "
            f"({detail}); use a new root or rename the points"
        )
    for p in sweep.points:
        points[p.name] = p.definition()
    recorded["name"] = sweep.name
    paths.makedirs(root)
    paths.write_text(path, json.dumps(recorded, indent=2, sort_keys=True))


class _PointLog:
    """A point's run.log as the run's stdout. Locally the file itself, opened for append; in a
    bucket (no append there) a local temporary file whose text is added to the object when
    the run ends (`close`)."""

    def __init__(self, path: str):
        self.path = path
        if paths.is_remote(path):
            self._file = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115
        else:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        if paths.is_remote(self.path):
            self._file.seek(0)
            before = paths.read_text(self.path) if paths.exists(self.path) else ""
            paths.write_text(self.path, before + self._file.read())
        self._file.close()


def launch_commands(sweep: Sweep, root: str, python: str = "python") -> list[str]:
    """One `experiments.run` command per point (root may be a gs:// path)."""
    return [p.command(root, python) for p in sweep.points]


def tpu_name(sweep: Sweep, point: Point) -> str:
    """A TPU/queued-resource name for a point: lowercase, digits and hyphens."""
    raw = f"{sweep.name}-{point.name}".lower()
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", raw)).strip("-")
    if not name[:1].isalpha():
        name = "s-" + name
    return name[:MAX_NAME].rstrip("-")


def tpu_launch_commands(sweep: Sweep, root: str, tpu_args: str) -> list[str]:
    """One `python -m launch.tpu all` command per point: its own slice, created and torn down.

    `tpu_args` are the launcher's flags shared by every point (zone, accelerator, slices...).
    """
    commands = []
    for point in sweep.points:
        workdir = f"{root.rstrip('/')}/{point.name}"
        run_args = point.args(workdir)[1:]  # --config=..., --workdir=..., overrides
        config_and_workdir, overrides = run_args[:2], run_args[2:]
        args = ["launch.tpu", "all", f"--name={tpu_name(sweep, point)}"]
        args += shlex.split(tpu_args) + config_and_workdir
        if overrides:
            args += ["--", *overrides]
        commands.append(" ".join(["python", "-m", *map(shlex.quote, args)]))
    return commands


def run_sweep(
    sweep: Sweep,
    root: str,
    *,
    parallel: int = 1,
    env: Mapping[str, str] | None = None,
    echo: bool = True,
) -> dict[str, PointStatus]:
    """Trains every point that is not done; returns each point's status afterwards.

    Args:
      sweep: the points.
      root: the sweep folder (created); point workdirs live under it.
      parallel: processes at once (1: one after another).
      env: extra environment variables for the runs.
      echo: print each command and result as it happens.

    A failing point does not stop the others; its status stays "pending"/"partial" and its
    log names the error. Every config is loaded and validated before the first run starts.
    """
    if parallel < 1:
        raise ValueError(f"parallel = {parallel!r}: expected >= 1")
    root = paths.resolve(root)
    steps = sweep.num_steps()  # Loads and validates every config.
    check_manifest(sweep, root)
    todo = [p for p in sweep.points if point_status(p, root, steps[p.name]).state != "done"]
    run_env = {**os.environ, **(env or {})}
    running: list[tuple[Point, subprocess.Popen, float, object]] = []

    def start(point: Point) -> None:
        workdir = paths.join(root, point.name)
        paths.makedirs(workdir)
        log = _PointLog(paths.join(workdir, LOG_FILE))
        if echo:
            print(f"$ {point.command(root)}", flush=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", *point.args(workdir)],
            cwd=REPO,
            env=run_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        running.append((point, proc, time.perf_counter(), log))

    def reap(block: bool) -> None:
        while running:
            for item in list(running):
                point, proc, started, log = item
                if proc.poll() is None:
                    continue
                log.close()
                running.remove(item)
                if echo:
                    outcome = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                    minutes = (time.perf_counter() - started) / 60
                    where = paths.join(root, point.name, LOG_FILE)
                    print(f"  {point.name}: {outcome} in {minutes:.1f} min ({where})", flush=True)
                return
            if not block:
                return
            time.sleep(0.5)

    try:
        for point in todo:
            while len(running) >= parallel:
                reap(block=True)
            start(point)
        while running:
            reap(block=True)
    except BaseException:
        for _, proc, _, _log in running:  # Interrupted: stop the runs (they save and exit).
            proc.terminate()
        for _, proc, _, log in running:
            proc.wait()
            log.close()
        raise
    return {p.name: point_status(p, root, steps[p.name]) for p in sweep.points}
