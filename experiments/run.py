"""The main entry point: train (or resume) an experiment.

    python -m experiments.run --config=experiments/configs/quickstart.py --workdir=runs/quickstart

Any config field can be overridden on the command line, e.g. `--config.optim.peak_lr=3e-4`
or `--config.train.num_steps=50`. Rerunning the same command resumes from the latest snapshot.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.distributed import initialize_distributed
from experiments.logs import quiet_library_logs
from ling_jax.train.finite import NonFiniteError
from ling_jax.train.trainer import train_and_evaluate
from ling_jax.train.workdir_lock import WorkdirLockedError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and caches.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_library_logs()
    initialize_distributed()
    logging.info("JAX %s on %s", jax.__version__, jax.devices())
    try:
        metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (NonFiniteError, WorkdirLockedError) as error:
        sys.exit(f"error: {error}")  # A clear one-line reason and exit status 1.
    for name, value in sorted(metrics.items()):
        print(f"{name}={value:.4f}")


if __name__ == "__main__":
    app.run(main)
