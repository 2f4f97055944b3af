"""RL post-training (GRPO / GSPO / LPO with Evo-CoT rewards) from an SFT run's snapshot.

    python -m experiments.rl --config=experiments/configs/rl_quickstart.py --workdir=runs/rl \\
        --config.rl.init_from=runs/sft

Prints the greedy accuracy on held-out arithmetic problems before and after, and writes
<workdir>/rl_metrics.jsonl (one line per step) and <workdir>/rl_summary.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments.logs import quiet_library_logs  # noqa: E402
from ling_jax.posttrain.rl import train_rl  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "RL config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the RL metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_library_logs()
    summary = train_rl(_CONFIG.value, _WORKDIR.value)
    for name, value in sorted(summary.items()):
        print(f"{name}={value}")


if __name__ == "__main__":
    app.run(main)
