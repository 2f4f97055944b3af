"""Runs experiments.run on a Cloud TPU VM, a pod slice, or a multislice queued resource.

    python -m launch.tpu all --dry-run --name=ling-mini --zone=us-east5-a \\
        --accelerator=v5p-256 --slices=2 --capacity=spot \\
        --config=experiments/configs/ling_mini_2.py --workdir=gs://my-bucket/runs/ling-mini \\
        -- --config.train.num_steps=1000

Commands: `create` (a TPU VM for one slice, a queued resource for several or with --queued,
waiting until it is ACTIVE), `deploy` (a `git archive` of --ref copied to every worker,
unpacked into ~/ling-jax, installed with `.[tpu]` and `jax[tpu]` into ~/ling-jax-venv),
`run` (starts the run on every worker in the background, its output in ~/ling-jax-run.log),
`logs` (follows that log on one worker until the run there exits), `stop` (SIGTERM to the
run on every worker: it saves a snapshot and exits), `teardown` (deletes the TPU or the queued
resource), and `all` (create, deploy, run, logs, then teardown unless --keep).

Flags after `--` go to experiments.run unchanged. Give every command the same --name, --zone,
--slices and --queued: they decide between `tpu-vm` and `queued-resources` commands. On a
multislice queued resource the TPU runtime sets the MEGASCALE_* variables itself; the trainer
calls jax.distributed.initialize().
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

from launch.accelerators import LaunchError, TpuSlice, parse_accelerator
from launch.steps import (
    REPO,
    Step,
    add_run_args,
    check_config,
    check_name,
    check_overrides,
    check_slices,
    check_workdir,
    execute,
    experiment_argv,
    print_plan,
    require,
    run_env,
    split_overrides,
)

COMMANDS = {
    "create": "create the TPU VM or queued resource (and wait until it is ACTIVE)",
    "deploy": "copy a git archive to every worker and install it with .[tpu] and jax[tpu]",
    "run": "start experiments.run on every worker, in the background",
    "logs": "follow the run's log on one worker until the run there exits",
    "stop": "SIGTERM the run on every worker (it saves a snapshot, then exits)",
    "teardown": "delete the TPU VM or queued resource",
    "all": "create, deploy, run, logs, then teardown (unless --keep)",
}

# Worker-side paths, relative to $HOME (double-quoted in scripts so that $HOME expands).
SRC = "ling-jax"
TARBALL = "ling-jax.tar.gz"
VENV = "ling-jax-venv"
LOG = "ling-jax-run.log"
PID = "ling-jax-run.pid"


def _home(path: str) -> str:
    return f'"$HOME/{path}"'


def _where(args) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _gcloud(args, *words: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *words, args.name, *_where(args)]


def queued(args) -> bool:
    return args.slices > 1 or args.queued


def _ssh(args, script: str, *, worker: str = "all", node: str = "all") -> tuple[str, ...]:
    if queued(args):
        argv = _gcloud(args, "queued-resources", "ssh") + [f"--node={node}"]
    else:
        argv = _gcloud(args, "tpu-vm", "ssh")
    return tuple(argv + [f"--worker={worker}", f"--command={script}"])


def create_steps(args, tpu: TpuSlice) -> list[Step]:
    capacity = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[args.capacity]
    version = args.runtime_version or tpu.runtime_version
    shape = f"{args.slices} x {tpu.accelerator_type}" if args.slices > 1 else tpu.accelerator_type
    if not queued(args):
        argv = _gcloud(args, "tpu-vm", "create") + [
            f"--accelerator-type={tpu.accelerator_type}",
            f"--version={version}",
        ]
        return [
            Step(f"create: TPU VM {args.name} ({shape})", (*argv, *capacity, *args.create_flag))
        ]
    nodes = (
        [f"--node-count={args.slices}", f"--node-prefix={args.name}"]
        if args.slices > 1
        else [f"--node-id={args.name}"]
    )
    create = _gcloud(args, "queued-resources", "create") + [
        f"--accelerator-type={tpu.accelerator_type}",
        f"--runtime-version={version}",
        *nodes,
    ]
    wait = _gcloud(args, "queued-resources", "describe") + ["--format=value(state.state)"]
    return [
        Step(
            f"create: queued resource {args.name} ({shape})",
            (*create, *capacity, *args.create_flag),
        ),
        Step(
            f"wait until queued resource {args.name} is ACTIVE",
            tuple(wait),
            until="ACTIVE",
            fail_on=("FAILED", "SUSPENDED"),
            poll_seconds=args.poll_seconds,
        ),
    ]


def local_tarball(args) -> str:
    return os.path.join(tempfile.gettempdir(), f"ling-jax-{args.name}.tar.gz")


def deploy_steps(args) -> list[Step]:
    tarball = local_tarball(args)
    pack = ("git", "-C", REPO, "archive", "--format=tar.gz", f"--output={tarball}", args.ref)
    kind = ["queued-resources", "scp"] if queued(args) else ["tpu-vm", "scp"]
    scp = ["gcloud", "compute", "tpus", *kind, tarball, f"{args.name}:{TARBALL}", *_where(args)]
    scp += ["--node=all", "--worker=all"] if queued(args) else ["--worker=all"]
    py = shlex.quote(args.python)
    install = " ".join(
        [
            "set -euo pipefail;",
            *_refuse_if_running("replacing its code"),
            f"rm -rf {_home(SRC)}; mkdir -p {_home(SRC)};",
            f"tar -xzf {_home(TARBALL)} -C {_home(SRC)};",
            # TPU VM images ship Python 3.10; uv fetches the Python the package needs.
            "python3 -m pip install --user --quiet --upgrade uv;",
            f'if [ ! -x "$HOME/{VENV}/bin/python" ]; then',
            f"python3 -m uv venv --python {py} {_home(VENV)}; fi;",
            f'python3 -m uv pip install --python "$HOME/{VENV}/bin/python"',
            f'--editable "$HOME/{SRC}[tpu]" "jax[tpu]";',
            'echo "$(hostname): installed"',
        ]
    )
    return [
        Step(f"pack: git archive of {args.ref} into {tarball}", pack),
        Step("copy: the source tarball to every worker", tuple(scp)),
        Step("install: .[tpu] and jax[tpu] on every worker", _ssh(args, install)),
    ]


def _refuse_if_running(action: str) -> list[str]:
    pid = _home(PID)
    return [
        f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then',
        f'echo "$(hostname): a run is going (pid $(cat {pid})); stop it before {action}" >&2;',
        "exit 1; fi;",
    ]


def run_script(args) -> str:
    env = run_env(args.env, args.libtpu_init_args, args.tpu_log_level)
    exports = [f"export {key}={shlex.quote(value)};" for key, value in env.items()]
    argv = experiment_argv(f"$HOME/{VENV}/bin/python", args.config, args.workdir, args.overrides)
    command = f'"{argv[0]}" ' + shlex.join(argv[1:])
    pid = _home(PID)
    return " ".join(
        [
            "set -euo pipefail;",
            f"cd {_home(SRC)};",
            *_refuse_if_running("starting another"),
            *exports,
            f"nohup {command} >> {_home(LOG)} 2>&1 < /dev/null &",
            f"echo $! > {pid};",
            'echo "$(hostname): started pid $!"',
        ]
    )


def run_steps(args) -> list[Step]:
    return [Step("run: experiments.run on every worker", _ssh(args, run_script(args)))]


def logs_steps(args) -> list[Step]:
    pid, log = _home(PID), _home(LOG)
    # --pid ends the tail when the run exits; without a pid file it follows until interrupted.
    script = f'pid="$(cat {pid} 2>/dev/null || true)"; tail -n +1 -F ${{pid:+--pid=$pid}} {log}'
    where = f"node {args.node}, worker {args.worker}" if queued(args) else f"worker {args.worker}"
    return [
        Step(
            f"logs: follow the run's log on {where}",
            _ssh(args, script, worker=args.worker, node=args.node),
        )
    ]


def stop_steps(args) -> list[Step]:
    pid = _home(PID)
    script = (
        f'if [ -f {pid} ] && kill -TERM "$(cat {pid})" 2>/dev/null; then '
        'echo "$(hostname): sent SIGTERM (the run saves a snapshot, then exits)"; '
        'else echo "$(hostname): no run going"; fi'
    )
    return [Step("stop: SIGTERM to the run on every worker", _ssh(args, script))]


def teardown_steps(args) -> list[Step]:
    if queued(args):
        argv = _gcloud(args, "queued-resources", "delete") + ["--force", "--quiet"]
        return [Step(f"teardown: delete queued resource {args.name} and its TPUs", tuple(argv))]
    argv = _gcloud(args, "tpu-vm", "delete") + ["--quiet"]
    return [Step(f"teardown: delete TPU VM {args.name}", tuple(argv))]


def plan(args) -> list[Step]:
    """Checks the arguments `args.command` needs and returns its steps."""
    check_name(args.name)
    check_slices(args.slices)
    tpu = None
    if args.command in ("create", "run", "all"):
        require(args, "accelerator")
        tpu = parse_accelerator(args.accelerator)
    if args.command in ("run", "all"):
        require(args, "config", "workdir")
        check_config(args.config)
        check_workdir(args.workdir, tpu.hosts * args.slices)
        check_overrides(args.overrides)
        run_env(args.env, args.libtpu_init_args, args.tpu_log_level)
    if args.command == "all":
        steps = create_steps(args, tpu) + deploy_steps(args) + run_steps(args) + logs_steps(args)
        return steps if args.keep else steps + teardown_steps(args)
    builders = {
        "create": lambda: create_steps(args, tpu),
        "deploy": lambda: deploy_steps(args),
        "run": lambda: run_steps(args),
        "logs": lambda: logs_steps(args),
        "stop": lambda: stop_steps(args),
        "teardown": lambda: teardown_steps(args),
    }
    return builders[args.command]()


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU (or queued resource) name")
    common.add_argument("--zone", required=True, help="e.g. us-east5-a")
    common.add_argument("--project", help="GCP project (default: gcloud's configured one)")
    common.add_argument("--accelerator", help="accelerator type of one slice, e.g. v5p-256")
    common.add_argument("--slices", type=int, default=1, help="number of slices (multislice > 1)")
    common.add_argument(
        "--queued", action="store_true", help="use a queued resource for a single slice too"
    )
    common.add_argument("--runtime-version", help="TPU software version (default: per generation)")
    common.add_argument(
        "--capacity", choices=("on-demand", "spot", "reserved"), default="on-demand"
    )
    common.add_argument(
        "--create-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for the gcloud create command, e.g. --create-flag=--network=NET",
    )
    common.add_argument(
        "--ref",
        default="HEAD",
        help="git ref to ship; to ship uncommitted edits of tracked files (not new files): "
        '--ref="$(git stash create)"',
    )
    common.add_argument("--python", default="3.12", help="Python version for the workers' venv")
    common.add_argument("--worker", default="0", help="`logs`: the worker to follow")
    common.add_argument("--node", default="0", help="`logs`: the slice to follow (multislice)")
    common.add_argument("--keep", action="store_true", help="`all`: keep the TPU at the end")
    common.add_argument("--poll-seconds", type=float, default=30.0, help=argparse.SUPPRESS)
    add_run_args(common)
    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu",
        description=__doc__.split("\n\n")[0],
        epilog="Flags after `--` are passed to experiments.run.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command, summary in COMMANDS.items():
        sub.add_parser(command, parents=[common], help=summary, description=summary)
    return parser


def _warn_if_dirty(args) -> None:
    if args.ref != "HEAD":
        return
    status = subprocess.run(
        ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if status.strip():
        print(
            "warning: the working tree has uncommitted changes that HEAD does not ship "
            '(use --ref="$(git stash create)" to ship them)',
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    own, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own)
    args.overrides = overrides
    try:
        steps = plan(args)
        if args.dry_run:
            print_plan(steps)
            return 0
        if args.command in ("deploy", "all"):
            _warn_if_dirty(args)
        execute(steps)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the TPU and the run are left as they are", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
