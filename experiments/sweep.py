"""Runs a sweep (a list of experiments.run points), resumably, and tabulates its results.

    python -m experiments.sweep --config=experiments/configs/wind_tunnel_micro.py --root=runs/wt
    python -m experiments.sweep --config=FILE --root=DIR --parallel=2          # 2 processes
    python -m experiments.sweep --config=FILE --root=DIR --only=xs,s           # some points
    python -m experiments.sweep --config=FILE --root=DIR --status              # read-only
    python -m experiments.sweep --config=FILE --root=gs://bucket/wt --commands # one per point
    python -m experiments.sweep --config=FILE --root=DIR --set=optim.peak_lr=1e-3  # all points
    python -m experiments.sweep --config=FILE --root=gs://bucket/wt \\
        --tpu_args="--zone=us-east5-a --accelerator=v5p-64"                     # launch.tpu ones

`--config=FILE[:ARG]` names a Python file whose `get_sweep([ARG])` returns an
`experiments.sweeps.Sweep` (see experiments/configs/wind_tunnel_micro.py). Finished points are
skipped and interrupted ones resume; the table goes to <root>/results.csv and results.json.
`--status` only prints the table: it trains nothing and writes nothing.
"""

from __future__ import annotations

import argparse
import sys

from experiments.sweeps.results import collect, format_table, write_results
from experiments.sweeps.runner import launch_commands, run_sweep, tpu_launch_commands
from experiments.sweeps.spec import load_sweep, parse_assignment
from ling_jax.io import paths

TABLE_COLUMNS = ["name", "state", "last_step", "num_steps", "eval_loss", "train_ce", "wall_seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="FILE[:ARG] defining get_sweep()")
    parser.add_argument("--root", required=True, help="the sweep's folder (point workdirs)")
    parser.add_argument("--parallel", type=int, default=1, help="processes at once")
    parser.add_argument("--only", default="", help="comma-separated point names")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a config field set on every point (repeatable), e.g. data.train_files=gs://...",
    )
    parser.add_argument(
        "--status", action="store_true", help="print the table only: train and write nothing"
    )
    parser.add_argument("--commands", action="store_true", help="print experiments.run commands")
    parser.add_argument("--tpu_args", default=None, help="print launch.tpu commands with these")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.config)
        if args.only:
            sweep = sweep.select([n for n in args.only.split(",") if n])
        if args.set:
            sweep = sweep.with_overrides(dict(parse_assignment(a) for a in args.set))
        sweep.num_steps()  # Every point's config is valid before anything runs.
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.commands or args.tpu_args is not None:
        if args.tpu_args is not None:
            lines = tpu_launch_commands(sweep, args.root, args.tpu_args)
        else:
            lines = launch_commands(sweep, args.root)
        print("\n".join(lines))
        return 0
    root = paths.resolve(args.root)
    if not args.status:
        try:
            run_sweep(sweep, root, parallel=args.parallel)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    rows = collect(sweep, root)
    columns = TABLE_COLUMNS[:2] + [c for c in ("compute", "params") if c in rows[0]]
    print(format_table(rows, columns + TABLE_COLUMNS[2:]))
    if args.status:  # Read-only: the stored results table is left as the last run wrote it.
        return 0
    csv_path, _ = write_results(rows, root)
    print(f"results: {csv_path}")
    unfinished = [r["name"] for r in rows if r["state"] != "done"]
    if unfinished:
        print(f"not finished: {unfinished} (see <root>/<point>/run.log)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
