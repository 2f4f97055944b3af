"""What both launchers share: the steps they run (or print), and checks of the run's arguments.

A launch is a list of `Step`s, each one command line. `--dry-run` prints them as shell lines
(copy-pasteable, comments start with `#`) and runs nothing; otherwise each runs in turn and the
first failure stops the launch.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from launch.accelerators import LaunchError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GCS = re.compile(r"^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?$")
MAX_NAME = 40  # JobSet pod names and TPU node names add suffixes to it


@dataclasses.dataclass(frozen=True)
class Step:
    """One command. `stdin` is fed to it; with `until`, it is rerun until its output is that."""

    title: str
    argv: tuple[str, ...]
    stdin: str | None = None
    until: str | None = None  # poll: the stripped stdout that ends the wait
    fail_on: tuple[str, ...] = ()  # poll: outputs that end it with an error
    poll_seconds: float = 30.0

    def shell(self) -> str:
        """The step as one shell line (a here-document when it reads stdin)."""
        line = shlex.join(self.argv)
        if self.stdin is not None:
            body = self.stdin if self.stdin.endswith("\n") else self.stdin + "\n"
            return f"{line} <<'EOF'\n{body}EOF"
        return line


def print_plan(steps: Sequence[Step], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    for i, step in enumerate(steps, 1):
        print(f"# [{i}/{len(steps)}] {step.title}", file=out)
        if step.until is not None:
            print(f"# (rerun every {step.poll_seconds:g} s until it prints {step.until})", file=out)
        print(step.shell(), file=out)


def execute(
    steps: Sequence[Step], runner: Callable[..., subprocess.CompletedProcess] | None = None
) -> None:
    """Runs the steps in order; a failing command raises LaunchError naming the step."""
    runner = runner or subprocess.run
    for i, step in enumerate(steps, 1):
        print(f"# [{i}/{len(steps)}] {step.title}", file=sys.stderr, flush=True)
        print(f"+ {shlex.join(step.argv)}", file=sys.stderr, flush=True)
        try:
            if step.until is not None:
                _poll(step, runner)
            else:
                runner(list(step.argv), input=step.stdin, text=True, check=True)
        except FileNotFoundError as e:
            raise LaunchError(f"{step.title}: {step.argv[0]} is not installed ({e})") from e
        except subprocess.CalledProcessError as e:
            raise LaunchError(f"{step.title}: exit status {e.returncode}") from e


def _poll(step: Step, runner) -> None:
    while True:
        state = runner(list(step.argv), text=True, check=True, capture_output=True).stdout.strip()
        if state == step.until:
            return
        if state in step.fail_on:
            raise LaunchError(f"{step.title}: state {state}")
        print(f"  state {state or '(none yet)'}; waiting", file=sys.stderr, flush=True)
        time.sleep(step.poll_seconds)


def check_name(name: str) -> str:
    if len(name) > MAX_NAME or not _NAME.match(name):
        raise LaunchError(
            f"--name {name!r}: expected lowercase letters, digits and hyphens, starting with a "
            f"letter, not ending with a hyphen, at most {MAX_NAME} characters"
        )
    return name


def check_slices(slices: int) -> int:
    if slices < 1:
        raise LaunchError(f"--slices {slices}: the number of slices must be a positive integer")
    return slices


def check_workdir(workdir: str, processes: int) -> str:
    """A multi-host run writes one checkpoint from every host: the workdir must be shared."""
    if workdir.startswith("gs://"):
        if not _GCS.match(workdir):
            raise LaunchError(
                f"--workdir {workdir!r}: expected gs://BUCKET/PATH (bucket names are lowercase)"
            )
    elif processes > 1:
        raise LaunchError(
            f"--workdir {workdir!r}: a run on {processes} hosts needs a workdir every host "
            "shares, a gs://BUCKET/PATH"
        )
    return workdir


def check_config(config: str) -> str:
    """The config file, relative to the repository root (the workers run from its copy)."""
    path = config.split(":", 1)[0]  # config_flags takes `file.py:argument`
    if os.path.isabs(path):
        raise LaunchError(
            f"--config {config!r}: give the path relative to the repository root, "
            "e.g. experiments/configs/ling_mini_2.py (workers run from their own copy)"
        )
    if not os.path.isfile(os.path.join(REPO, path)):
        raise LaunchError(f"--config {config!r}: no such file under {REPO}")
    return config


def check_overrides(overrides: Sequence[str]) -> list[str]:
    """Flags passed through to experiments.run, e.g. --config.train.num_steps=50."""
    for flag in overrides:
        if not flag.startswith("--") or flag == "--":
            raise LaunchError(
                f"override {flag!r}: experiments.run takes flags only, "
                "e.g. --config.train.num_steps=50"
            )
        if flag == "--dry-run":
            raise LaunchError("--dry-run after `--` would go to experiments.run: put it before")
        if re.match(r"^--(config|workdir)(=|$)", flag):
            raise LaunchError(f"override {flag!r}: give --config/--workdir to the launcher itself")
    return list(overrides)


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def run_env(
    extra: Sequence[str], libtpu_init_args: str | None, tpu_log_level: int
) -> dict[str, str]:
    """The run's environment: the TPU backend, libtpu's log level and flags, then --env."""
    env = {"JAX_PLATFORMS": "tpu", "TPU_STDERR_LOG_LEVEL": str(tpu_log_level)}
    if libtpu_init_args:
        env["LIBTPU_INIT_ARGS"] = libtpu_init_args
    env.update(parse_env(extra))
    return env


def experiment_argv(python: str, config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
    return [python, "-m", "experiments.run", f"--config={config}", f"--workdir={workdir}"] + list(
        overrides
    )


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits `launcher args -- experiments.run overrides`."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def add_run_args(parser) -> None:
    """The experiments.run arguments both launchers take."""
    parser.add_argument("--config", help="experiment config, relative to the repository root")
    parser.add_argument("--workdir", help="run directory; gs://BUCKET/PATH for multi-host runs")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variable for the run (repeatable)",
    )
    parser.add_argument(
        "--libtpu-init-args",
        default=os.environ.get("LIBTPU_INIT_ARGS"),
        help="LIBTPU_INIT_ARGS for the run (default: this shell's LIBTPU_INIT_ARGS, if set)",
    )
    parser.add_argument(
        "--tpu-log-level",
        type=int,
        default=2,
        choices=range(4),
        help="TPU_STDERR_LOG_LEVEL: 0 info, 1 warning, 2 error (default), 3 fatal",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def require(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) in (None, ""):
            raise LaunchError(f"--{name.replace('_', '-')} is required for `{args.command}`")
