"""Runs experiments.run as a JobSet on GKE TPU node pools: one replicated job per slice.

    python -m launch.gke render --name=ling-mini --accelerator=v5p-256 --slices=2 \\
        --image=us-docker.pkg.dev/PROJECT/REPO/ling-jax:TAG \\
        --config=experiments/configs/ling_mini_2.py --workdir=gs://my-bucket/runs/ling-mini \\
        -- --config.train.num_steps=1000

Commands: `render` (the JobSet YAML to stdout, or to --output), `apply` (`kubectl apply` of
it), `logs` (follows worker 0 of slice 0), `delete` (`kubectl delete jobset`). `--dry-run`
prints the kubectl commands, with the YAML as a here-document, and runs nothing.

The cluster needs the JobSet controller and one TPU node pool per slice whose accelerator and
topology match. GKE's TPU webhook sets TPU_WORKER_ID, TPU_WORKER_HOSTNAMES and, for several
slices, the MEGASCALE_* variables in every pod; the trainer calls jax.distributed.initialize().
The image holds the repository at its working directory with `.[tpu]` and `jax[tpu]`
installed (launch/Dockerfile).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from launch.accelerators import LaunchError, TpuSlice, parse_accelerator
from launch.steps import (
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
    "render": "print the JobSet YAML (or write it to --output)",
    "apply": "kubectl apply the JobSet",
    "logs": "follow one worker's log (slice 0, worker 0 by default)",
    "delete": "kubectl delete the JobSet",
}
CONTAINER = "ling-jax"
REPLICATED_JOB = "slice"


def jobset(args, tpu: TpuSlice) -> dict:
    """The JobSet: `args.slices` replicas of a Job with one pod per host of a slice."""
    env = run_env(args.env, args.libtpu_init_args, args.tpu_log_level)
    node_selector = {
        "cloud.google.com/gke-tpu-accelerator": tpu.generation.gke_accelerator,
        "cloud.google.com/gke-tpu-topology": tpu.topology,
    }
    if args.spot:
        node_selector["cloud.google.com/gke-spot"] = "true"
    container = {
        "name": CONTAINER,
        "image": args.image,
        "command": experiment_argv("python", args.config, args.workdir, args.overrides),
        "env": [{"name": key, "value": value} for key, value in env.items()],
        # The TPU runtime's ports between hosts and slices, as in GKE's TPU examples.
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": tpu.chips_per_host}},
    }
    if args.image_workdir:
        container["workingDir"] = args.image_workdir
    pod = {
        "restartPolicy": "Never",
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "nodeSelector": node_selector,
        # SIGTERM makes the trainer save a snapshot; give it time to finish.
        "terminationGracePeriodSeconds": args.grace_seconds,
        "containers": [container],
    }
    if args.service_account:
        pod["serviceAccountName"] = args.service_account
    job = {
        "parallelism": tpu.hosts,
        "completions": tpu.hosts,
        "backoffLimit": 0,  # one failed host fails the slice; the JobSet restarts all slices
        "template": {"spec": pod},
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": args.name,
            "namespace": args.namespace,
            # One slice per node pool: a slice's hosts share one ICI domain.
            "annotations": {
                "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
            },
        },
        "spec": {
            "failurePolicy": {"maxRestarts": args.max_restarts},
            "replicatedJobs": [
                {"name": REPLICATED_JOB, "replicas": args.slices, "template": {"spec": job}}
            ],
        },
    }


def render(args, tpu: TpuSlice) -> str:
    return yaml.safe_dump(jobset(args, tpu), sort_keys=False, default_flow_style=False)


def _kubectl(args, *words: str) -> tuple[str, ...]:
    context = [f"--context={args.context}"] if args.context else []
    return ("kubectl", *context, *words, f"--namespace={args.namespace}")


def apply_steps(args, tpu: TpuSlice) -> list[Step]:
    title = f"apply: JobSet {args.name} ({args.slices} x {tpu.accelerator_type})"
    return [Step(title, _kubectl(args, "apply", "-f", "-"), stdin=render(args, tpu))]


def logs_steps(args) -> list[Step]:
    selector = ",".join(
        [
            f"jobset.sigs.k8s.io/jobset-name={args.name}",
            f"jobset.sigs.k8s.io/job-index={args.slice}",
            f"batch.kubernetes.io/job-completion-index={args.worker}",
        ]
    )
    argv = _kubectl(args, "logs", "--follow", f"--selector={selector}", f"--container={CONTAINER}")
    return [Step(f"logs: follow slice {args.slice}, worker {args.worker}", argv)]


def delete_steps(args) -> list[Step]:
    return [Step(f"delete: JobSet {args.name}", _kubectl(args, "delete", "jobset", args.name))]


def _check(args) -> TpuSlice | None:
    check_name(args.name)
    check_slices(args.slices)
    if args.command not in ("render", "apply"):
        return None
    if not args.image:  # No public image exists: every user builds and pushes their own.
        raise LaunchError(
            f"--image is required for `{args.command}`: the container image to run, built from "
            "a commit with launch/Dockerfile (`git archive --format=tar HEAD | docker build "
            "-f launch/Dockerfile -t IMAGE -`, then `docker push IMAGE`)"
        )
    require(args, "accelerator", "config", "workdir")
    tpu = parse_accelerator(args.accelerator, args.topology)
    check_config(args.config)
    check_workdir(args.workdir, tpu.hosts * args.slices)
    check_overrides(args.overrides)
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts {args.max_restarts}: expected 0 or more")
    return tpu


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="JobSet name")
    common.add_argument("--namespace", default="default")
    common.add_argument("--context", help="kubectl context (default: the current one)")
    common.add_argument("--accelerator", help="accelerator type of one slice, e.g. v5p-256")
    common.add_argument("--topology", help="slice topology (default: from the accelerator)")
    common.add_argument("--slices", type=int, default=1, help="number of slices (node pools)")
    common.add_argument("--image", help="container image with the repository installed")
    common.add_argument("--image-workdir", help="the repository's path in the image")
    common.add_argument("--service-account", help="Kubernetes service account (GCS access)")
    common.add_argument("--spot", action="store_true", help="schedule onto spot node pools")
    common.add_argument("--max-restarts", type=int, default=0, help="JobSet restarts on failure")
    common.add_argument("--grace-seconds", type=int, default=300, help="SIGTERM to SIGKILL")
    common.add_argument("--output", help="`render`: write the YAML here instead of stdout")
    common.add_argument("--slice", default="0", help="`logs`: the slice to follow")
    common.add_argument("--worker", default="0", help="`logs`: the worker to follow")
    add_run_args(common)
    parser = argparse.ArgumentParser(
        prog="python -m launch.gke",
        description=__doc__.split("\n\n")[0],
        epilog="Flags after `--` are passed to experiments.run.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command, summary in COMMANDS.items():
        sub.add_parser(command, parents=[common], help=summary, description=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    own, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    args.overrides = overrides
    try:
        tpu = _check(args)
        if args.command == "render":
            text = render(args, tpu)
            if args.output and not args.dry_run:
                with open(args.output, "w") as f:
                    f.write(text)
            else:
                sys.stdout.write(text)
            return 0
        steps = {
            "apply": lambda: apply_steps(args, tpu),
            "logs": lambda: logs_steps(args),
            "delete": lambda: delete_steps(args),
        }[args.command]()
        if args.dry_run:
            print_plan(steps)
        else:
            execute(steps)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
