"""`python -m launch.gke`: the JobSet YAML (replicas, topology, command), kubectl commands."""

from __future__ import annotations

import shlex
import subprocess

import pytest
import yaml

from launch import gke

CONFIG = "experiments/configs/smoke.py"
IMAGE = "us-docker.pkg.dev/proj/repo/ling-jax:abc123"
OVERRIDES = ["--config.train.num_steps=50", "--config.data.train_files=gs://bkt/d/*.arrayrecord"]


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"subprocess called: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)


def render(capsys, *argv: str, overrides=OVERRIDES) -> dict:
    assert gke.main(["render", *argv, "--", *overrides]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def pod_spec(doc: dict) -> dict:
    [rjob] = doc["spec"]["replicatedJobs"]
    return rjob["template"]["spec"]["template"]["spec"]


def test_multislice_jobset(capsys):
    doc = render(
        capsys,
        *("--name=ling-ms", "--accelerator=v5p-256", "--slices=2", f"--image={IMAGE}"),
        *(f"--config={CONFIG}", "--workdir=gs://bkt/runs/ms", "--spot", "--max-restarts=3"),
        "--libtpu-init-args=--xla_tpu_flag=1",
    )
    assert (doc["apiVersion"], doc["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert doc["metadata"]["name"] == "ling-ms"
    assert doc["metadata"]["annotations"] == {
        "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
    }
    assert doc["spec"]["failurePolicy"] == {"maxRestarts": 3}
    [rjob] = doc["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 2
    job = rjob["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["backoffLimit"]) == (32, 32, 0)
    pod = pod_spec(doc)
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
        "cloud.google.com/gke-tpu-topology": "4x4x8",
        "cloud.google.com/gke-spot": "true",
    }
    assert pod["hostNetwork"] is True and pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert container["image"] == IMAGE
    assert container["command"] == [
        "python",
        "-m",
        "experiments.run",
        f"--config={CONFIG}",
        "--workdir=gs://bkt/runs/ms",
        *OVERRIDES,
    ]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {
        "JAX_PLATFORMS": "tpu",
        "TPU_STDERR_LOG_LEVEL": "2",
        "LIBTPU_INIT_ARGS": "--xla_tpu_flag=1",
    }


def test_single_host_slice(capsys):
    doc = render(
        capsys,
        *("--name=ling-one", "--accelerator=v6e-8", f"--image={IMAGE}", f"--config={CONFIG}"),
        "--workdir=/mnt/runs/one",  # one host: a local (mounted) workdir is allowed
        overrides=[],
    )
    [rjob] = doc["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 1 and rjob["template"]["spec"]["parallelism"] == 1
    pod = pod_spec(doc)
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4"
    assert "cloud.google.com/gke-spot" not in pod["nodeSelector"]
    assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": 8}
    assert pod["containers"][0]["command"][-1] == "--workdir=/mnt/runs/one"


def test_explicit_topology_and_output_file(capsys, tmp_path):
    out = tmp_path / "jobset.yaml"
    argv = ["--name=t", "--accelerator=v5p-256", "--topology=2x8x8", f"--image={IMAGE}"]
    argv += [f"--config={CONFIG}", "--workdir=gs://bkt/r", f"--output={out}"]
    assert gke.main(["render", *argv]) == 0
    assert capsys.readouterr().out == ""
    doc = yaml.safe_load(out.read_text())
    assert pod_spec(doc)["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x8x8"


def test_apply_logs_delete_dry_run(capsys):
    common = ["--name=ling-ms", "--namespace=research", "--dry-run"]
    argv = [*common, "--accelerator=v6e-64", "--slices=4", f"--image={IMAGE}"]
    argv += [f"--config={CONFIG}", "--workdir=gs://bkt/r"]
    assert gke.main(["apply", *argv, "--", *OVERRIDES]) == 0
    title, command, *body, end = capsys.readouterr().out.splitlines()
    assert title.startswith("# [1/1] apply: JobSet ling-ms (4 x v6e-64)")
    assert shlex.split(command) == ["kubectl", "apply", "-f", "-", "--namespace=research", "<<EOF"]
    assert command.endswith("<<'EOF'") and end == "EOF"  # a quoted here-document: no expansion
    doc = yaml.safe_load("\n".join(body))
    assert doc["spec"]["replicatedJobs"][0]["replicas"] == 4
    assert pod_spec(doc)["containers"][0]["command"][-2:] == OVERRIDES

    assert gke.main(["logs", *common, "--slice=1"]) == 0
    logs = shlex.split(capsys.readouterr().out.splitlines()[1])
    assert logs[:3] == ["kubectl", "logs", "--follow"]
    selector = logs[3].removeprefix("--selector=").split(",")
    assert "jobset.sigs.k8s.io/jobset-name=ling-ms" in selector
    assert "jobset.sigs.k8s.io/job-index=1" in selector
    assert "batch.kubernetes.io/job-completion-index=0" in selector

    assert gke.main(["delete", *common, "--context=gke_proj_zone_c"]) == 0
    delete = shlex.split(capsys.readouterr().out.splitlines()[1])
    assert delete == [
        "kubectl",
        "--context=gke_proj_zone_c",
        "delete",
        "jobset",
        "ling-ms",
        "--namespace=research",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--accelerator=v5p-256", f"--config={CONFIG}", "--workdir=gs://bkt/r"],
            "--image is required for `render`: the container image to run, built from a commit "
            "with launch/Dockerfile",
        ),
        (["--accelerator=v9-8", f"--image={IMAGE}"], "unknown accelerator type 'v9-8'"),
        (["--accelerator=v5p-256", f"--image={IMAGE}", "--topology=4x4"], "expected 3 axes"),
        (["--accelerator=v5p-256", f"--image={IMAGE}", "--slices=0"], "--slices 0"),
        (["--accelerator=v5p-256", f"--image={IMAGE}", "--workdir=/tmp/r"], "gs://"),
        (["--accelerator=v6e-8", f"--image={IMAGE}", "--max-restarts=-1"], "--max-restarts"),
    ],
)
def test_errors(capsys, argv, message):
    defaults = {"--config": f"--config={CONFIG}", "--workdir": "--workdir=gs://bkt/r"}
    given = {a.split("=")[0] for a in argv}
    extra = [value for key, value in defaults.items() if key not in given]
    assert gke.main(["render", "--name=t", *argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
