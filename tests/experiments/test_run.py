"""The training job end to end: resume equals an uninterrupted run, preemption, bad input."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import smoke
from ling_jax.train.metrics import read_metrics
from ling_jax.train.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def smoke_config(**train):
    cfg = smoke.get_config()
    for key, value in train.items():
        cfg.train[key] = value
    return cfg


def losses(workdir: str) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[str, dict]:
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    final = train_and_evaluate(smoke_config(), workdir)
    return workdir, final


def test_run_trains_evaluates_and_checkpoints(uninterrupted):
    workdir, final = uninterrupted
    assert set(losses(workdir)) == set(range(1, 7))
    assert {"eval/loss", "eval/bits_per_byte", "eval/mtp_loss"} <= set(final)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
    records = read_metrics(workdir)
    assert any("train/mfu" in r and "train/tokens_per_sec" in r for r in records)
    assert any("moe/max_load_ratio" in r for r in records)


def test_resumed_run_equals_uninterrupted(uninterrupted, tmp_path):
    workdir = str(tmp_path)
    train_and_evaluate(smoke_config(num_steps=4), workdir)  # "killed" after step 4
    final = train_and_evaluate(smoke_config(num_steps=6), workdir)  # same command, resumed
    reference = losses(uninterrupted[0])
    resumed = losses(workdir)
    assert set(resumed) == set(range(1, 7))
    for step in range(1, 7):
        np.testing.assert_allclose(
            resumed[step], reference[step], rtol=1e-6, err_msg=f"step {step}"
        )
    np.testing.assert_allclose(final["eval/loss"], uninterrupted[1]["eval/loss"], rtol=1e-6)


def test_incompatible_checkpoint_is_refused_and_kept(uninterrupted, tmp_path):
    workdir = str(tmp_path)
    train_and_evaluate(smoke_config(num_steps=2), workdir)
    checkpoint = os.path.join(workdir, "checkpoints", "2")
    before = sorted(os.listdir(checkpoint))
    cfg = smoke_config(num_steps=4)
    cfg.model.hidden_size = 32
    with pytest.raises(ValueError, match="different model.*hidden_size"):
        train_and_evaluate(cfg, workdir)
    assert sorted(os.listdir(checkpoint)) == before
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


def test_corrupt_checkpoint_is_refused(tmp_path):
    workdir = str(tmp_path)
    train_and_evaluate(smoke_config(num_steps=2), workdir)
    state_dir = os.path.join(workdir, "checkpoints", "2", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(ValueError, match="checkpoints/2 could not be restored"):
        train_and_evaluate(smoke_config(num_steps=4), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


def test_missing_data_glob_fails_early(tmp_path):
    cfg = smoke_config()
    cfg.data.source = "files"
    cfg.data.train_files = str(tmp_path / "nothing" / "*.jsonl")
    with pytest.raises(ValueError, match="nothing"):
        train_and_evaluate(cfg, str(tmp_path / "run"))


def test_tokenizer_larger_than_model_vocab_fails(tmp_path):
    cfg = smoke_config()
    cfg.model.vocab_size = 280  # the smoke BPE has 300 tokens
    with pytest.raises(ValueError, match="vocab"):
        train_and_evaluate(cfg, str(tmp_path))


def _run_command(workdir, *overrides):
    # One CPU device (the in-process tests cover the 8-device mesh) and the session's XLA cache.
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "--config=experiments/configs/smoke.py",
            f"--workdir={workdir}",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_unknown_config_field_is_rejected(tmp_path):
    proc = _run_command(tmp_path, "--config.optim.not_a_field=1")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "not_a_field" in err


def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
    workdir = str(tmp_path)
    proc = _run_command(workdir, "--config.train.num_steps=1000")
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and any("train/loss" in r for r in read_metrics(workdir)):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    stopped_at = max(losses(workdir))
    assert max(saved) == stopped_at < 1000
    rerun = _run_command(workdir, f"--config.train.num_steps={stopped_at + 2}")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert "Resuming from" in err
    steps = sorted(losses(workdir))
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]


def test_init_from_another_run_takes_its_weights(uninterrupted, tmp_path):
    """A context-extension-style stage: new RoPE theta, weights of the previous stage."""
    from ling_jax.train.merge import merge_target, restore_weights

    cfg = smoke_config(num_steps=1)
    cfg.optim.peak_lr = 1e-30  # far below fp32 resolution: step 1 leaves the weights as loaded
    cfg.optim.bias_update_rate = 0.0
    cfg.model.rope.theta = 20000.0
    cfg.checkpoint.init_from = uninterrupted[0]
    train_and_evaluate(cfg, str(tmp_path))
    target = merge_target(cfg)
    loaded = restore_weights(str(tmp_path), 1, target)
    source = restore_weights(uninterrupted[0], 6, target)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(source), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="holds no snapshot|does not exist"):
        cfg.checkpoint.init_from = str(tmp_path / "nowhere")
        train_and_evaluate(cfg, str(tmp_path / "fresh"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _wait_all(procs, timeout=600):
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]


def test_two_processes_match_one_and_resume(tmp_path):
    """jax.distributed on localhost (CPU collectives): 2 processes x 1 device, each feeding its
    rows of the global batch, give the single-process losses, also across a resume."""
    rows = "--config.data.process_sharding=rows"
    single = str(tmp_path / "single")
    multi = str(tmp_path / "multi")

    def two_processes(num_steps):
        port = _free_port()
        return [
            _run_command(
                multi,
                rows,
                f"--config.train.num_steps={num_steps}",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            )
            for i in range(2)
        ]

    _wait_all([_run_command(single, rows, "--config.train.num_steps=6")])
    _wait_all(two_processes(4))
    _wait_all(two_processes(6))  # resumes from the 2-process snapshot at step 4
    reference, resumed = losses(single), losses(multi)
    assert sorted(resumed) == sorted(reference) == list(range(1, 7))
    for step in reference:
        np.testing.assert_allclose(resumed[step], reference[step], rtol=1e-5, err_msg=str(step))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_during_start_up_stops_at_once_and_writes_nothing(
    signum, tmp_path, monkeypatch
):
    """A start-up that waits for data forever (as a corpus of empty files did) still stops."""
    from ling_jax.train import trainer

    def stalled_data(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(120)
        raise AssertionError("the stop signal did not interrupt the wait")

    monkeypatch.setattr(trainer, "build_datasets", stalled_data)
    before = signal.getsignal(signum)
    started = time.monotonic()
    assert train_and_evaluate(smoke_config(), str(tmp_path)) == {}
    assert time.monotonic() - started < 60
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
    assert signal.getsignal(signum) is before


def test_ctrl_c_during_training_saves_like_sigterm(uninterrupted, tmp_path, monkeypatch):
    from ling_jax.train import trainer

    build = trainer.build_datasets
    fetched = []

    def interrupted_on_third_batch(*args, **kwargs):
        datasets = build(*args, **kwargs)

        def count(batch):
            fetched.append(1)
            if len(fetched) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return batch

        return datasets._replace(train=datasets.train.map(count))

    monkeypatch.setattr(trainer, "build_datasets", interrupted_on_third_batch)
    workdir = str(tmp_path)
    train_and_evaluate(smoke_config(num_steps=1000), workdir)  # no KeyboardInterrupt
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    assert saved == [2, 3] and max(losses(workdir)) == 3
    # The snapshot matches the uninterrupted run's step 3 (the same batches were consumed).
    np.testing.assert_allclose(losses(workdir)[3], losses(uninterrupted[0])[3], rtol=1e-6)


def test_two_processes_stop_at_the_same_step_on_one_sigterm(tmp_path):
    """A pod's scheduler may SIGTERM one host first: all hosts save the same step and exit 0,
    and the same command resumes them all from it. Default `documents` sharding: the hosts
    read disjoint shards that together hold every training document."""
    workdir = str(tmp_path)

    def two_processes(num_steps):
        port = _free_port()
        return [
            _run_command(
                workdir,
                f"--config.train.num_steps={num_steps}",
                # No evaluation, so that only the train step compiles.
                "--config.data.validation_fraction=0",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            )
            for i in range(2)
        ]

    procs = two_processes(1000)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and losses(workdir):
            break
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    stopped = [re.findall(r"Stopped at step (\d+)", err) for err in errs]
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped
    step = int(stopped[0][0])
    saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    assert max(saved) == step == max(losses(workdir)) < 1000
    shards = [
        re.findall(r"process (\d) of 2 reads (\d+) of the (\d+) training documents", e)
        for e in errs
    ]
    for i, shard in enumerate(shards):
        assert {s[0] for s in shard} == {str(i)}, shard
    for (_, n0, total), (_, n1, _) in zip(shards[0], shards[1], strict=True):
        assert int(n0) + int(n1) == int(total) and abs(int(n0) - int(n1)) <= 1

    rerun = two_processes(step + 2)
    errs = [p.communicate(timeout=300)[1] for p in rerun]
    assert [p.returncode for p in rerun] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert all(f"checkpoints/{step}" in err and "Resuming from" in err for err in errs)
    assert sorted(losses(workdir))[-2:] == [step + 1, step + 2]


def test_sigterm_while_waiting_for_data_saves_the_last_step(
    uninterrupted, tmp_path, monkeypatch, caplog
):
    """A read that stalls mid-run (batch 5 here) does not hold a SIGTERM back: the wait on the
    prefetch thread is abandoned, step 4 is kept, and the resumed run equals the uninterrupted
    one."""
    from ling_jax.train import trainer

    workdir = str(tmp_path)
    build = trainer.build_datasets
    fetched = []

    def stall_on_fifth_batch(batch):
        fetched.append(1)
        if len(fetched) == 5:
            deadline = time.time() + 120
            while 4 not in losses(workdir) and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)  # The loop is now waiting for this batch.
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        return batch

    def stalling_data(*args, **kwargs):
        datasets = build(*args, **kwargs)
        return datasets._replace(train=datasets.train.map(stall_on_fifth_batch))

    monkeypatch.setattr(trainer, "build_datasets", stalling_data)
    cfg = smoke_config()
    cfg.data.batch_prefetch = 2
    train_and_evaluate(cfg, workdir)
    assert "Stopped at step 4 while waiting for data" in caplog.text
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert max(losses(workdir)) == 4
    monkeypatch.undo()
    train_and_evaluate(cfg, workdir)
    reference, resumed = losses(uninterrupted[0]), losses(workdir)
    assert sorted(resumed) == list(range(1, 7))
    for step in (5, 6):
        np.testing.assert_allclose(resumed[step], reference[step], rtol=1e-6, err_msg=str(step))
