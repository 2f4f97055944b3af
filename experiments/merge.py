"""WSM: merge a run's orbax snapshots into one checkpoint (instead of decaying the LR).

    python -m experiments.merge --workdir=runs/quickstart --output=runs/quickstart_merged \\
        --last=8 [--shape=linear] [--config=experiments/configs/quickstart.py] \\
        [--evaluate] [--hf_output=runs/quickstart_hf [--hf_dtype=bfloat16]]

Selection (one of): --last=N (the latest N snapshots), --top=N (the N with the lowest eval/loss
logged at their step in metrics.jsonl), --steps=100,200,... (exactly these), or neither (all);
--min_step/--max_step and --every=K (multiples of K only) narrow the candidates of --last, --top
and the default. --shape picks the emulated decay: linear (the uniform mean), cosine, 1-sqrt.

The output is a run directory with one snapshot, `<output>/checkpoints/<last merged step>/`,
that `experiments.run` with the same --config resumes (further training) or, with
--config.train.num_steps equal to that step, evaluates only, which is what --evaluate does.
--config is the training config (model, optimizer: it builds the fresh optimizer state; data
and eval for --evaluate); by default it is the one the run last started with, as recorded in
<workdir>/metrics.jsonl (its `hparams` line, command-line overrides included).

The merge runs on the config's mesh (`mesh.*`): each process reads and sums only its shards of
the weights and writes its shards of the merged snapshot. On several hosts (or several local
processes) start it on each, as `experiments.run` (--coordinator_address, --num_processes,
--process_id off TPU pods); --hf_output and --evaluate then need the merge's hosts as well.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Quiets XLA's C++ logging.

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments.distributed import initialize_distributed  # noqa: E402
from experiments.logs import quiet_library_logs  # noqa: E402
from ling_jax.convert.hf_export import export_workdir  # noqa: E402
from ling_jax.io import paths  # noqa: E402
from ling_jax.train import merge  # noqa: E402
from ling_jax.train.finite import NonFiniteError  # noqa: E402
from ling_jax.train.trainer import train_and_evaluate  # noqa: E402
from ling_jax.train.wsm import decay_curve, merge_weights  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The run's experiment config (default: recorded in its metrics.jsonl)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run whose snapshots are merged.")
_OUTPUT = flags.DEFINE_string("output", None, "New run directory for the merged snapshot.")
_LAST = flags.DEFINE_integer("last", 0, "Merge the latest N snapshots.")
_TOP = flags.DEFINE_integer("top", 0, "Merge the N snapshots with the lowest eval/loss.")
_STEPS = flags.DEFINE_list("steps", [], "Merge exactly these snapshot steps.")
_MIN_STEP = flags.DEFINE_integer("min_step", None, "Only snapshots at or after this step.")
_MAX_STEP = flags.DEFINE_integer("max_step", None, "Only snapshots at or before this step.")
_EVERY = flags.DEFINE_integer("every", 0, "Only snapshots whose step is a multiple of this.")
_SHAPE = flags.DEFINE_string("shape", "linear", "Emulated decay: linear (mean), cosine, 1-sqrt.")
_EVALUATE = flags.DEFINE_bool("evaluate", False, "Evaluate the merged snapshot on validation.")
_HF_OUTPUT = flags.DEFINE_string("hf_output", None, "Also export the merge as an HF checkpoint.")
_HF_DTYPE = flags.DEFINE_string("hf_dtype", None, "HF tensor dtype (default: the params').")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        _merge()
    except NonFiniteError as error:
        sys.exit(f"error: {error}")  # A clear one-line reason and exit status 1.


def _merge() -> None:
    quiet_library_logs()
    initialize_distributed()
    if _HF_OUTPUT.value and jax.process_count() > 1:  # Before any work: export reads on one host.
        raise app.UsageError(
            f"--hf_output exports on one process, this merge runs on {jax.process_count()}: "
            "merge, then `python -m ling_jax.convert.hf export --workdir=OUTPUT --output=HF_DIR`"
        )
    workdir = paths.resolve(_WORKDIR.value)
    config = _CONFIG.value
    if config is None:
        config = merge.run_config(workdir)
        print(f"config: the run's, recorded in {paths.join(workdir, 'metrics.jsonl')}")
    decay_curve(_SHAPE.value)  # Fails early on an unknown shape.
    metrics_path = paths.join(workdir, "metrics.jsonl")
    losses = merge.validation_losses(workdir) if paths.exists(metrics_path) else {}
    steps = merge.select_steps(
        merge.snapshot_steps(workdir),
        last=_LAST.value,
        top=_TOP.value,
        steps=[int(s) for s in _STEPS.value],
        min_step=_MIN_STEP.value,
        max_step=_MAX_STEP.value,
        every=_EVERY.value,
        losses=losses if _TOP.value else None,
    )
    weights = merge_weights(len(steps), _SHAPE.value)
    print(f"merging {len(steps)} snapshots of {workdir} ({_SHAPE.value} weights):")
    for step, weight in zip(steps, weights, strict=True):
        loss = f"{losses[step]:.4f}" if step in losses else "-"
        print(f"  step {step:>8d}  weight {weight:.4f}  eval/loss {loss}")

    def report(step: int, snapshot) -> None:
        if step == steps[0]:  # The same layout for every snapshot: say it once.
            held, total = merge.held_bytes(snapshot)
            print(
                f"process {jax.process_index()} of {jax.process_count()} holds {held} of "
                f"{total} bytes of each snapshot's weights (its shards; the fp32 sum alike)"
            )

    merged = merge.merge_snapshots(
        workdir,
        steps,
        weights,
        merge.merge_target(config),
        merge.model_fields(config),
        shardings=merge.merge_shardings(config),
        on_restore=report,
    )
    info = {
        "source": workdir,
        "steps": steps,
        "weights": weights.tolist(),
        "shape": _SHAPE.value,
    }
    path = merge.write_merged_checkpoint(
        config, _OUTPUT.value, merged, source_workdir=workdir, step=steps[-1], info=info
    )
    print(f"wrote {path}")
    if _HF_OUTPUT.value:  # From the merged snapshot just written, with the run's tokenizer.
        tokenizer = config.data.tokenizer  # "": the BPE the run trained, copied to --output.
        export_workdir(_OUTPUT.value, _HF_OUTPUT.value, tokenizer=tokenizer, dtype=_HF_DTYPE.value)
        print(f"wrote HF checkpoint {_HF_OUTPUT.value} (with its tokenizer)")
    del merged
    if _EVALUATE.value:
        config.train.num_steps = steps[-1]  # Resume at the merged step: evaluate only.
        for name, value in sorted(train_and_evaluate(config, _OUTPUT.value).items()):
            print(f"{name}={value:.4f}")


if __name__ == "__main__":
    app.run(main)
