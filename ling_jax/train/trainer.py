"""`train_and_evaluate(config, workdir)`: the training job behind `python -m experiments.run`.

Builds the data pipeline, the model and the jitted step, resumes from the latest snapshot in
`workdir` if there is one, then trains for `train.num_steps`, writing metrics, evaluating and
saving snapshots periodically. SIGTERM (preemption) or Ctrl-C saves a snapshot (on every host
at the same step; `ling_jax.train.preemption`) and returns cleanly;
rerunning the same command resumes with the same data and the same loss trajectory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from flax import nnx
from jax.sharding import NamedSharding

from ling_jax.data import Datasets, build_datasets, check_vocab
from ling_jax.io import paths
from ling_jax.model import flops_per_token
from ling_jax.model import fp8 as model_fp8
from ling_jax.model.param_table import format_param_table
from ling_jax.parallel.mesh import BATCH_AXES, batch_axes_size, make_mesh
from ling_jax.train.checkpointing import Checkpointer, abstract_like
from ling_jax.train.console import StepTimer, format_eval_line, format_train_line
from ling_jax.train.experiment import validate_experiment_config
from ling_jax.train.finite import NonFiniteGuard
from ling_jax.train.fp8_monitor import Fp8Monitor
from ling_jax.train.merge import initialize_weights_from
from ling_jax.train.merged_eval import MergedEvaluation
from ling_jax.train.metrics import (
    make_writer,
    model_flops_utilization,
    peak_flops_per_device,
    truncate_metrics,
)
from ling_jax.train.optimizer import make_optimizer
from ling_jax.train.preemption import Interrupted, Preemption
from ling_jax.train.profiling import ProfileWindow
from ling_jax.train.schedules import make_schedule
from ling_jax.train.sharded_state import init_sharded_train_state
from ling_jax.train.train_step import (
    batch_sharding,
    jit_eval_step,
    jit_train_step,
    make_eval_step,
    make_train_step,
)
from ling_jax.train.workdir_lock import hold_workdir_lock


def _to_global(batch: dict, sharding: NamedSharding) -> dict:
    """Per-process numpy rows -> one global array per key, rows split over the data axis."""
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }


def _process_datasets(config, workdir: str, process_index: int, process_count: int) -> Datasets:
    """This process's share of every batch ([global batch / processes, seq_len] rows)."""
    local_rows = config.train.batch_size // process_count
    if config.data.process_sharding == "documents":
        return build_datasets(
            config.data,
            workdir=workdir,
            batch_size=local_rows,
            process_index=process_index,
            process_count=process_count,
        )
    full = build_datasets(config.data, workdir=workdir, batch_size=config.train.batch_size)
    rows = slice(process_index * local_rows, (process_index + 1) * local_rows)

    def keep_rows(batch: dict) -> dict:
        return {key: value[rows] for key, value in batch.items()}

    validation = None if full.validation is None else full.validation.map(keep_rows)
    return Datasets(full.train.map(keep_rows), validation, full.tokenizer)


def evaluate(eval_step, state, batches: Iterable[dict], max_batches: int, sharding) -> dict:
    """Mean validation loss, bits per byte, MTP loss and accuracy over the validation batches."""
    totals: dict[str, float] = {}
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        sums = jax.device_get(eval_step(state, _to_global(batch, sharding)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    if not totals.get("tokens"):
        return {}
    metrics = {
        "eval/loss": totals["ce_sum"] / totals["tokens"],
        "eval/accuracy": totals["correct"] / totals["tokens"],
    }
    if totals.get("mtp_tokens"):
        metrics["eval/mtp_loss"] = totals["mtp_ce_sum"] / totals["mtp_tokens"]
    if totals.get("target_bytes"):
        metrics["eval/bits_per_byte"] = totals["ce_sum"] / math.log(2) / totals["target_bytes"]
    return metrics


def _console(message: str, *args) -> None:
    """A progress line, printed by process 0 only (the others would print the same)."""
    if jax.process_index() == 0:
        logging.info(message, *args)


def _mean_metrics(window: list[dict]) -> dict[str, float]:
    fetched = jax.device_get(window)
    return {key: float(np.mean([m[key] for m in fetched])) for key in fetched[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) the experiment; returns the last evaluation metrics.

    Raises WorkdirLockedError if another run holds `workdir`, NonFiniteError if the run
    diverges (and `train.on_nonfinite` does not skip it). SIGTERM or Ctrl-C saves a snapshot
    and returns, on every process at the same step; one that arrives before the first step
    stops at once and writes nothing.
    """
    config = validate_experiment_config(config)
    with Preemption() as preemption, hold_workdir_lock(workdir):
        try:
            return _train_and_evaluate(config, workdir, preemption)
        except Interrupted as stop:
            logging.warning(
                "Stopped by %s before the first step: no snapshot written (earlier ones are kept).",
                stop,
            )
            return {}


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, preemption: Preemption
) -> dict[str, float]:
    workdir = paths.resolve(workdir)  # Local: absolute; gs://: unchanged.
    paths.makedirs(workdir)
    process_count, process_index = jax.process_count(), jax.process_index()
    if config.train.batch_size % process_count:
        raise ValueError(
            f"train.batch_size = {config.train.batch_size} does not split over "
            f"{process_count} processes"
        )
    mesh = make_mesh(config.mesh)
    if config.train.batch_size % batch_axes_size(mesh):
        raise ValueError(
            f"train.batch_size = {config.train.batch_size} does not split over the "
            f"{batch_axes_size(mesh)} devices of the mesh's batch axes {BATCH_AXES}"
        )
    row_sharding = batch_sharding(mesh)

    datasets = _process_datasets(config, workdir, process_index, process_count)
    check_vocab(datasets.tokenizer, config.model.vocab_size)
    train_iter = iter(datasets.train)

    schedule = make_schedule(config.schedule, config.optim.peak_lr)
    optimizer = make_optimizer(config.optim, schedule)
    graphdef, state, shardings = init_sharded_train_state(
        config.model, optimizer, mesh, config.seed
    )
    train_step = jit_train_step(
        make_train_step(graphdef, optimizer, schedule, config.train, config.optim, config.model),
        mesh=mesh,
        state_shardings=shardings,
    )
    eval_step = jit_eval_step(make_eval_step(graphdef), mesh=mesh, state_shardings=shardings)
    mtp_weight = config.train.mtp_loss_weight
    fp8_monitor = Fp8Monitor(graphdef, config.model, config.train.micro_batches, mtp_weight)
    if model_fp8.enabled(config.model):
        logging.info("FP8 training: %s", model_fp8.plan(config.model))

    checkpointer = Checkpointer(workdir, config.checkpoint, config.model)
    start_step = 0
    restored = checkpointer.restore_latest(abstract_like(state), train_iter)
    if restored is not None:
        state, latest = restored
        logging.info("Resuming from %s/%d", checkpointer.directory, latest)
        start_step = int(state.step)
    elif config.checkpoint.init_from:
        logging.info("Initialising the weights from %s", config.checkpoint.init_from)
        state = initialize_weights_from(config.checkpoint.init_from, state, shardings)

    if process_index == 0:
        truncate_metrics(workdir, start_step)  # Rows a killed run wrote after its snapshot.
    writer = make_writer(workdir)
    if start_step == 0:
        writer.write_hparams(config.to_dict())
        logging.info("Parameters:\n%s", format_param_table(config.model, True, config.data.seq_len))
        logging.info(
            "Parameter overview:\n%s",
            parameter_overview.get_parameter_overview(
                jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)), include_stats=False
            ),
        )
    num_steps = config.train.num_steps
    tokens_per_step = config.train.batch_size * config.data.seq_len
    flops = flops_per_token(config.model, config.data.seq_len).total
    peak, peak_source = peak_flops_per_device()
    _console("MFU peak: %.3g FLOP/s per device (%s)", peak, peak_source)
    profile = None
    if config.logging.profile and process_index == 0:
        profile = ProfileWindow(
            workdir, config.logging.profile_first_step, config.logging.profile_num_steps
        )

    merged_eval = MergedEvaluation(config, workdir, checkpointer, shardings)
    guard = NonFiniteGuard(config.train.on_nonfinite, config.train.max_nonfinite_skips)
    eval_metrics: dict[str, float] = {}
    window: list[dict] = []
    timer = StepTimer()
    run_start = time.perf_counter()
    step = start_step
    try:
        if step >= num_steps and datasets.validation is not None:
            # Nothing to train (e.g. a WSM-merged snapshot at its own step): evaluate it only.
            eval_metrics = evaluate(
                eval_step, state, datasets.validation, config.eval.max_batches, row_sharding
            )
            writer.write_scalars(step, eval_metrics)
            _console(format_eval_line(step, eval_metrics))
        if step < num_steps:
            _console("Compiling the train step (and running step %d)...", step + 1)
        while step < num_steps:
            try:
                # A wait on the prefetch thread can be abandoned without moving the iterator.
                with preemption.interruptible(step == start_step or config.data.batch_prefetch):
                    host_batch = next(train_iter)
            except Interrupted:
                if step == start_step:
                    raise
                if checkpointer.latest_step() != step:
                    guard.check_now()  # Never snapshot the state of a non-finite step.
                    checkpointer.save(step, state, train_iter, force=True)
                logging.warning("Stopped at step %d while waiting for data; snapshot saved.", step)
                break
            batch = _to_global(host_batch, row_sharding)
            state, metrics = train_step(state, batch)
            step += 1
            guard.push(step, metrics)  # Checks the previous step: no wait on this one.
            window.append(metrics)
            if not timer.started:
                # The process's first step compiles; timing starts once it has finished.
                jax.block_until_ready(metrics)
                _console(
                    "Compiled and ran step %d in %.1f s", step, time.perf_counter() - run_start
                )
                timer.start(step)
            if fp8_monitor.due(step):
                jax.block_until_ready(state)  # Time the probe alone, not the queued steps.
                timer.pause()
                writer.write_scalars(step, fp8_monitor(step, state, batch))
                timer.resume()  # The probe is not training time.
            if profile is not None:
                profile(step, state)
            last_step = step == num_steps
            if step % config.logging.log_every_steps == 0 or last_step:
                summary = _mean_metrics(window)  # Blocks until the window's last step is done.
                timing = timer.window(step, num_steps)
                summary = {f"train/{k}" if "/" not in k else k: v for k, v in summary.items()}
                summary["uptime"] = time.perf_counter() - run_start
                line = {"loss": summary["train/loss"]}
                if timing.steps_per_sec is not None:  # None for the compile step alone
                    line["eta_seconds"] = timing.eta_seconds
                    tokens_per_sec = timing.steps_per_sec * tokens_per_step
                    summary["train/steps_per_sec"] = timing.steps_per_sec
                    summary["train/tokens_per_sec"] = line["tokens_per_sec"] = tokens_per_sec
                    if math.isfinite(peak):
                        mfu = model_flops_utilization(tokens_per_sec, flops, peak)
                        summary["train/mfu"] = line["mfu"] = mfu
                        summary["train/peak_flops_per_device"] = peak
                writer.write_scalars(step, summary)
                _console(format_train_line(step, num_steps, **line))
                window = []
            if step % config.eval.every_steps == 0 or last_step:
                guard.check_now()  # Do not evaluate (or log) a diverged state.
                if datasets.validation is not None:
                    jax.block_until_ready(state)  # Evaluation time starts after the queued steps.
                    timer.pause()
                    eval_metrics = evaluate(
                        eval_step,
                        state,
                        datasets.validation,
                        config.eval.max_batches,
                        row_sharding,
                    )
                    writer.write_scalars(step, eval_metrics)
                    _console(format_eval_line(step, eval_metrics))
                timer.resume()  # Evaluation is not training time.
            stop = preemption.should_stop(step, checkpointer.manager)
            save = last_step or stop
            if save or checkpointer.manager.should_save(step):
                guard.check_now()  # Never snapshot the state of a non-finite step.
            checkpointer.save(step, state, train_iter, force=save)
            if merged_eval.due(step) and datasets.validation is not None:
                jax.block_until_ready(state)
                timer.pause()
                merged_state = merged_eval.merged_state(step, state)
                if merged_state is not None:
                    merged_metrics = evaluate(
                        eval_step,
                        merged_state,
                        datasets.validation,
                        config.eval.max_batches,
                        row_sharding,
                    )
                    del merged_state
                    merged_metrics = {
                        k.replace("eval/", "eval/merged_"): v for k, v in merged_metrics.items()
                    }
                    writer.write_scalars(step, merged_metrics)
                    _console(format_eval_line(step, merged_metrics, "eval/merged_"))
                timer.resume()
            writer.flush()
            if stop and not last_step:
                logging.warning("Stopped at step %d on a stop request; snapshot saved.", step)
                break
    finally:
        if profile is not None:
            profile.close()  # Unblocked: after an error the state may be gone.
        checkpointer.close()
        writer.close()
        close = getattr(train_iter, "close", None)
        if close is not None:
            close()
    return eval_metrics
