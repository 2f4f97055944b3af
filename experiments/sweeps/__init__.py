"""The sweep API: describe runs as points, run them here or on pods, tabulate and fit results.

    from experiments import sweeps
    sweep = sweeps.Sweep.grid("lr", "experiments/configs/quickstart.py",
                              {"optim.peak_lr": [1e-3, 3e-3]})
    sweeps.run_sweep(sweep, "runs/lr", parallel=2)
    rows = sweeps.collect(sweep, "runs/lr")       # list of dicts; sweeps.to_dataframe(rows)

spec         Point, Sweep (grid or explicit points), config-file loading
runner       local execution (sequential or parallel processes), resumability, launch commands
results      the per-point results table (CSV, JSON, pandas)
wind_tunnel  planned ladders (ling_jax.scaling plans) as experiment configs and sweeps
analysis     power-law fits, predictions and plots of a ladder
"""

from experiments.sweeps.results import collect, read_results, to_dataframe, write_results
from experiments.sweeps.runner import (
    launch_commands,
    point_status,
    run_sweep,
    tpu_launch_commands,
)
from experiments.sweeps.spec import Point, Sweep, load_sweep

__all__ = [
    "Point",
    "Sweep",
    "collect",
    "launch_commands",
    "load_sweep",
    "point_status",
    "read_results",
    "run_sweep",
    "to_dataframe",
    "tpu_launch_commands",
    "write_results",
]
