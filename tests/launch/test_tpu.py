"""`python -m launch.tpu`: the dry-run plans for one slice and several, quoting, and errors."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time

import pytest

from launch import tpu
from launch.accelerators import LaunchError
from launch.steps import Step, execute

CONFIG = "experiments/configs/smoke.py"
REAL_RUN = subprocess.run  # the fixture patches subprocess.run; the worker-script tests need it
OVERRIDES = [
    "--config.train.num_steps=50",
    "--config.data.train_files=gs://bucket/data/*.arrayrecord",  # a glob the shell must keep
    "--config.logging.note=it's a run; with $HOME && spaces",  # quote, ;, $, & and spaces
]


def dry_run(capsys, *argv: str) -> list[tuple[str, list[str]]]:
    """Runs the CLI with --dry-run and returns (step title, argv) per printed command."""
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") :]) if "--" in argv else (argv, ())
    assert tpu.main([*own, "--dry-run", *rest]) == 0
    steps, title = [], None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("# ["):
            title = line.split("] ", 1)[1]
        elif not line.startswith("#"):
            steps.append((title, shlex.split(line)))
    return steps


def option(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def experiment(script: str) -> list[str]:
    """The experiments.run argv inside a worker script, as the worker's shell splits it."""
    words = shlex.split(script)
    start = words.index("experiments.run")
    return words[start + 1 : words.index(">>")]


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
    """A dry run calls nothing: no gcloud, no git, no network (the launcher's only way out is
    subprocess.run)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"subprocess called in a dry run: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)


def test_single_slice_all(capsys):
    steps = dry_run(
        capsys,
        "all",
        "--name=ling-smoke",
        "--zone=us-east5-a",
        "--project=my-proj",
        "--accelerator=v5p-64",
        "--capacity=spot",
        f"--config={CONFIG}",
        "--workdir=gs://bucket/runs/smoke",
        "--",
        *OVERRIDES,
    )
    heads = [argv[:5] for _, argv in steps]
    assert heads == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create"],
        ["git", "-C", tpu.REPO, "archive", "--format=tar.gz"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "delete"],
    ]
    titles = [title.split(":")[0] for title, _ in steps]
    assert titles == ["create", "pack", "copy", "install", "run", "logs", "teardown"]
    create, pack, scp, install, run, logs, teardown = (argv for _, argv in steps)

    assert create[5] == "ling-smoke"
    assert option(create, "accelerator-type") == "v5p-64"
    assert option(create, "version") == "v2-alpha-tpuv5"
    assert option(create, "zone") == "us-east5-a"
    assert option(create, "project") == "my-proj"
    assert "--spot" in create

    tarball = pack[-2].removeprefix("--output=")
    assert pack[-1] == "HEAD" and tarball.endswith("ling-jax-ling-smoke.tar.gz")
    assert scp[5:7] == [tarball, "ling-smoke:ling-jax.tar.gz"]
    for argv in (scp, install, run):
        assert option(argv, "worker") == "all"
    assert "jax[tpu]" in option(install, "command")
    assert '"$HOME/ling-jax[tpu]"' in option(install, "command")

    script = option(run, "command")
    assert experiment(script) == [f"--config={CONFIG}", "--workdir=gs://bucket/runs/smoke"] + (
        OVERRIDES
    )
    assert "export JAX_PLATFORMS=tpu;" in script
    assert "export TPU_STDERR_LOG_LEVEL=2;" in script
    assert "LIBTPU_INIT_ARGS" not in script

    assert option(logs, "worker") == "0"
    assert "tail" in option(logs, "command")
    assert teardown[5] == "ling-smoke" and "--quiet" in teardown


def test_multislice_all(capsys):
    steps = dry_run(
        capsys,
        "all",
        "--name=ling-ms",
        "--zone=us-east5-a",
        "--accelerator=v6e-64",
        "--slices=4",
        "--capacity=reserved",
        f"--config={CONFIG}",
        "--workdir=gs://bucket/runs/ms",
        "--libtpu-init-args=--xla_tpu_enable_async_all_gather=true --xla_foo=1",
        "--env=XLA_FLAGS=--xla_dump_to=/tmp/dump",
        "--",
        *OVERRIDES,
    )
    titles = [title.split(":")[0].split(" ")[0] for title, _ in steps]
    assert titles == ["create", "wait", "pack", "copy", "install", "run", "logs", "teardown"]
    create, wait, _, scp, install, run, logs, teardown = (argv for _, argv in steps)
    assert create[3:6] == ["queued-resources", "create", "ling-ms"]
    assert option(create, "node-count") == "4"
    assert option(create, "node-prefix") == "ling-ms"
    assert option(create, "runtime-version") == "v2-alpha-tpuv6e"
    assert "--reserved" in create and "--spot" not in create
    assert wait[3:5] == ["queued-resources", "describe"]
    assert option(wait, "format") == "value(state.state)"
    for argv in (scp, install, run):
        assert argv[3:5] in (["queued-resources", "scp"], ["queued-resources", "ssh"])
        assert (option(argv, "node"), option(argv, "worker")) == ("all", "all")
    assert (option(logs, "node"), option(logs, "worker")) == ("0", "0")
    assert teardown[3:5] == ["queued-resources", "delete"] and "--force" in teardown

    script = option(run, "command")
    assert experiment(script)[2:] == OVERRIDES
    env = [w for w in shlex.split(script) if "=" in w and w.split("=")[0].isupper()]
    assert "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true --xla_foo=1;" in env
    assert "XLA_FLAGS=--xla_dump_to=/tmp/dump;" in env
    assert not any(w.startswith("MEGASCALE") for w in env)  # the queued resource sets them


def test_libtpu_init_args_pass_through_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_flag=1")
    [(_, run)] = dry_run(
        capsys,
        *("run", "--name=t", "--zone=z", "--accelerator=v6e-8"),
        *(f"--config={CONFIG}", "--workdir=runs/local"),
    )
    assert "export LIBTPU_INIT_ARGS=--xla_tpu_flag=1;" in option(run, "command")


def test_keep_skips_teardown(capsys):
    steps = dry_run(
        capsys,
        *("all", "--name=t", "--zone=z", "--accelerator=v6e-8", "--keep"),
        *(f"--config={CONFIG}", "--workdir=gs://bkt/r"),
    )
    assert steps[-1][0].startswith("logs")


def test_single_commands(capsys):
    base = ["--name=t", "--zone=z"]
    [(_, logs)] = dry_run(capsys, "logs", *base, "--worker=3")
    assert logs[3:5] == ["tpu-vm", "ssh"] and option(logs, "worker") == "3"
    [(_, logs)] = dry_run(capsys, "logs", *base, "--slices=2", "--node=1")
    assert (option(logs, "node"), option(logs, "worker")) == ("1", "0")
    [(_, stop)] = dry_run(capsys, "stop", *base)
    assert "kill -TERM" in option(stop, "command") and option(stop, "worker") == "all"
    [(_, teardown)] = dry_run(capsys, "teardown", *base, "--queued")
    assert teardown[3:5] == ["queued-resources", "delete"]
    [(_, create), _] = dry_run(capsys, "create", *base, "--accelerator=v5p-8", "--queued")
    assert option(create, "node-id") == "t" and "--node-count" not in " ".join(create)
    steps = dry_run(capsys, "deploy", *base, "--ref=v1.0")
    assert [argv[-1] for _, argv in steps][0] == "v1.0"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["create", "--accelerator=v9-8"], "unknown accelerator type 'v9-8'"),
        (["create", "--accelerator=v5p-64", "--slices=0"], "--slices 0"),
        (["create", "--accelerator=v5p-64", "--slices=-2"], "positive"),
        (["create"], "--accelerator is required"),
        (["run", "--accelerator=v5p-64", f"--config={CONFIG}"], "--workdir is required"),
        (
            ["run", "--accelerator=v5p-64", f"--config={CONFIG}", "--workdir=runs/x"],
            "a run on 8 hosts needs .* gs://",
        ),
        (
            ["run", "--accelerator=v6e-8", "--slices=2", f"--config={CONFIG}", "--workdir=/x"],
            "a run on 2 hosts",
        ),
        (["run", "--accelerator=v6e-8", f"--config={CONFIG}", "--workdir=gs://"], "gs://BUCKET"),
        (
            ["run", "--accelerator=v6e-8", "--config=nope.py", "--workdir=gs://bkt/r"],
            "no such file",
        ),
        (
            ["run", "--accelerator=v6e-8", f"--config={CONFIG}", "--workdir=gs://bkt/r", "--env=X"],
            "KEY=VALUE",
        ),
        (
            ["run", "--accelerator=v6e-8", f"--config={CONFIG}", "--workdir=gs://bkt/r"]
            + ["--", "config.train.num_steps=5"],
            "flags only",
        ),
        (
            ["run", "--accelerator=v6e-8", f"--config={CONFIG}", "--workdir=gs://bkt/r"]
            + ["--", "--workdir=gs://bkt/other"],
            "give --config/--workdir to the launcher",
        ),
        (
            ["run", "--accelerator=v6e-8", f"--config={CONFIG}", "--workdir=gs://bkt/r"]
            + ["--", "--dry-run"],
            "put it before",
        ),
    ],
)
def test_errors(capsys, argv, message):
    assert tpu.main([*argv[:1], "--name=t", "--zone=z", "--dry-run", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err


def test_bad_name(capsys):
    assert tpu.main(["teardown", "--name=Ling_Mini", "--zone=z", "--dry-run"]) == 2
    assert "--name 'Ling_Mini'" in capsys.readouterr().err


class FakeRunner:
    """Records commands; `outputs` are what successive polls print."""

    def __init__(self, outputs=(), fail=None):
        self.calls, self.outputs, self.fail = [], list(outputs), fail

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        if argv[0] == self.fail:
            raise subprocess.CalledProcessError(1, argv)
        stdout = self.outputs.pop(0) if kwargs.get("capture_output") else None
        return subprocess.CompletedProcess(argv, 0, stdout=stdout)


def test_execute_runs_in_order_and_polls():
    runner = FakeRunner(["PROVISIONING\n", "ACTIVE\n"])
    steps = [
        Step("create", ("create",)),
        Step("wait", ("describe",), until="ACTIVE", poll_seconds=0),
        Step("copy", ("scp",)),
    ]
    execute(steps, runner)
    assert runner.calls == [["create"], ["describe"], ["describe"], ["scp"]]


def test_execute_stops_at_a_failure():
    with pytest.raises(LaunchError, match="copy: exit status 1"):
        execute([Step("copy", ("scp",)), Step("run", ("ssh",))], FakeRunner(fail="scp"))
    with pytest.raises(LaunchError, match="state FAILED"):
        execute([Step("wait", ("d",), until="ACTIVE", fail_on=("FAILED",))], FakeRunner(["FAILED"]))


def worker_script(capsys, command: str, *extra: str) -> str:
    argv = [command, "--name=t", "--zone=z", "--accelerator=v6e-8", *extra]
    argv += [f"--config={CONFIG}", "--workdir=gs://bkt/r", "--libtpu-init-args=--a=1 --b='2'"]
    [(_, ssh)] = [s for s in dry_run(capsys, *argv, "--", *OVERRIDES) if s[1][4] == "ssh"][-1:]
    return option(ssh, "command")


@pytest.mark.parametrize("command", ["deploy", "run", "logs", "stop"])
def test_worker_scripts_are_valid_bash(capsys, command):
    script = worker_script(capsys, command)
    REAL_RUN(["bash", "-n", "-c", script], check=True)


def test_run_script_starts_the_exact_command_line(capsys, tmp_path):
    """Runs the worker script in a fake $HOME: the fake python records the argv it gets."""
    venv = tmp_path / "ling-jax-venv" / "bin"
    venv.mkdir(parents=True)
    (tmp_path / "ling-jax").mkdir()
    fake = venv / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'printf "%s\\n" "$@" > "$HOME/argv"\n'
        'printf "%s\\n" "$JAX_PLATFORMS" "$LIBTPU_INIT_ARGS" > "$HOME/env"\n'
    )
    fake.chmod(0o755)
    script = worker_script(capsys, "run")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    REAL_RUN(["bash", "-c", script], check=True, env=env, capture_output=True)
    argv_file = tmp_path / "argv"
    for _ in range(200):  # the run starts in the background
        if argv_file.exists() and (tmp_path / "env").exists():
            break
        time.sleep(0.01)
    assert argv_file.read_text().splitlines() == [
        "-m",
        "experiments.run",
        f"--config={CONFIG}",
        "--workdir=gs://bkt/r",
        *OVERRIDES,
    ]
    assert (tmp_path / "env").read_text().splitlines() == ["tpu", "--a=1 --b='2'"]
    assert (tmp_path / "ling-jax-run.pid").read_text().strip().isdigit()

    # A second start while a run is going (here: this test's own pid) is refused.
    (tmp_path / "ling-jax-run.pid").write_text(str(os.getpid()))
    second = REAL_RUN(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert second.returncode == 1 and "a run is going" in second.stderr


def test_live_teardown_runs_gcloud(monkeypatch):
    runner = FakeRunner()
    monkeypatch.setattr(subprocess, "run", runner)
    assert tpu.main(["teardown", "--name=t", "--zone=z", "--project=p"]) == 0
    assert runner.calls == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--zone=z", "--project=p", "--quiet"]
    ]
