"""The CPU wind tunnel, end to end: run the micro ladder and the EL experiment, fit, predict, plot.

    nice -n 10 python -m experiments.wind_tunnel --root=runs/wind_tunnel [--parallel=1]

1. Trains the five-rung micro ladder (experiments/configs/wind_tunnel_micro.py) into
   <root>/ladder and the efficiency-leverage families (efficiency_leverage_micro.py) into
   <root>/leverage, as resumable sweeps (finished runs are reused).
2. Fits L(C) = a C^-b + c to the four smallest rungs and predicts the largest one's final
   validation loss with a 95% prediction interval; prints predicted vs measured, and the same
   for the pure power law L(C) = a C^-b (c = 0).
3. Measures the efficiency leverage C_dense / C_MoE at equal loss of the 1/32-activation MoE
   (and of the ladder's MoE) over the dense family, next to the law's EL(A, G, C).
4. Writes <root>/loss_vs_compute.png, <root>/el_vs_activation.png and <root>/report.json.

`--analyze_only` trains nothing and writes no results table: it analyses the finished runs
under <root> (or, where a sweep's run folders are absent, its stored `results.json`) and exits
with status 1, naming the runs that are missing or unfinished, rather than analysing a partial
result; a stored `results.json` is never overwritten by it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from experiments.sweeps import analysis
from experiments.sweeps.results import collect, format_table, read_results, write_results
from experiments.sweeps.runner import run_sweep
from experiments.sweeps.spec import Sweep, load_sweep

LADDER_CONFIG = "experiments/configs/wind_tunnel_micro.py"
LEVERAGE_CONFIG = "experiments/configs/efficiency_leverage_micro.py"
COLUMNS = [
    "name",
    "state",
    "seed",
    "compute",
    "params",
    "d_model",
    "num_layers",
    "tokens",
    "eval_loss",
    "wall_seconds",
]


class UnfinishedError(RuntimeError):
    """A sweep has runs that are missing or unfinished, so it cannot be analysed yet."""


def _run(sweep: Sweep, root: str, parallel: int) -> list[dict]:
    """Trains (resumably) and records the results table of whatever state the runs reach."""
    run_sweep(sweep, root, parallel=parallel)
    rows = collect(sweep, root)
    write_results(rows, root)
    print(f"\n{sweep.name} ({root}):\n{format_table(rows, COLUMNS)}", flush=True)
    return rows


def _stored_rows(sweep: Sweep, root: str) -> list[dict]:
    """The finished rows of every point, read-only: from the run folders, or from the stored
    `results.json` when no run folder exists; `UnfinishedError` names what is missing."""
    rows = collect(sweep, root)
    source = f"the run folders under {root}"
    if all(r["state"] == "pending" for r in rows) and os.path.exists(
        os.path.join(root, "results.json")
    ):
        stored = {r["name"]: r for r in read_results(root)}
        rows = [stored.get(p.name, {"name": p.name, "state": "missing"}) for p in sweep.points]
        source = os.path.join(root, "results.json")
    unfinished = [f"{r['name']} ({r['state']})" for r in rows if r["state"] != "done"]
    if unfinished:
        raise UnfinishedError(
            f"{sweep.name}: {len(unfinished)} of {len(rows)} runs not finished in {source}: "
            f"{', '.join(unfinished)}; train them first (drop --analyze_only)"
        )
    print(f"\n{sweep.name} ({source}):\n{format_table(rows, COLUMNS)}", flush=True)
    return rows


def _label(name: str, rows: list[dict]) -> str:
    """`name (A=x%)` from the rows' activation ratio."""
    ratios = {round(r["activation_ratio"], 4) for r in rows if "activation_ratio" in r}
    return f"{name} (A={ratios.pop():.1%})" if len(ratios) == 1 else name


def analyze(ladder_rows: list[dict], leverage_rows: list[dict], root: str) -> dict:
    """Fits, predictions, EL and plots; returns the report (also printed and saved)."""
    report: dict = {}
    fits, prediction = {}, None
    ladder_label = _label("ladder MoE", ladder_rows)
    if len(analysis.finished_computes(ladder_rows)) >= 4:
        # Headline: L = a C^-b + c (SPEC 7.2's form; c = 0 is the pure power law, so it nests
        # it). The pure power law is reported next to it.
        for key, irreducible in (("prediction", True), ("prediction_power_law", False)):
            p = analysis.predict_largest(ladder_rows, irreducible=irreducible)
            print(f"\nwind-tunnel prediction ({key}):\n" + p.describe())
            report[key] = {
                "fit_runs": p.fit_names,
                "target": p.target_name,
                "target_compute": p.target_compute,
                "a": p.fit.a,
                "b": p.fit.b,
                "b_stderr": p.fit.stderr["b"],
                "c": p.fit.c,
                "predicted": p.predicted,
                "interval": [p.lower, p.upper],
                "measured": p.measured,
                "measured_runs": p.measured_runs,
                "error": p.error,
            }
            if irreducible:
                prediction = p
                fits[ladder_label] = p.fit
    moe = [r for r in leverage_rows if r.get("arch") == "moe"]
    dense = [r for r in leverage_rows if r.get("arch") == "dense"]
    moe_label = _label("MoE", moe)
    series = {ladder_label: ladder_rows, moe_label: moe, "dense": dense}
    measured = []
    if len(analysis.finished(dense)) >= 3:
        for label, rows in ((moe_label, moe), (ladder_label, ladder_rows)):
            done = analysis.finished(rows)
            overlap = [
                r for r in done if r["compute"] <= 4 * analysis.finished(dense)[-1]["compute"]
            ]
            if len(overlap) < 3:
                continue
            m = analysis.measure_leverage(overlap, dense)
            measured.append(m)
            fits.setdefault(label, m.leverage.moe)  # The ladder keeps its prediction's fit.
            fits["dense"] = m.leverage.dense
            print(f"\nefficiency leverage, {label}:\n{m.describe()}")
            report.setdefault("leverage", {})[label] = {
                "activation_ratio": m.activation_ratio,
                "granularity": m.granularity,
                "compute": np.atleast_1d(m.leverage.compute).tolist(),
                "measured": np.atleast_1d(m.leverage.value).tolist(),
                "lower": np.atleast_1d(m.leverage.lower).tolist(),
                "upper": np.atleast_1d(m.leverage.upper).tolist(),
                "law": np.atleast_1d(m.predicted).tolist(),
            }
    present = {k: v for k, v in series.items() if analysis.finished(v)}
    if present:
        path = analysis.plot_loss_vs_compute(
            present, os.path.join(root, "loss_vs_compute.png"), fits=fits, prediction=prediction
        )
        report["loss_plot"] = path
    if measured:
        compute = float(np.atleast_1d(measured[0].leverage.compute)[-1])
        path = analysis.plot_leverage(
            measured, os.path.join(root, "el_vs_activation.png"), compute=compute
        )
        report["leverage_plot"] = path
    with open(os.path.join(root, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"\nreport: {os.path.join(root, 'report.json')}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="folder of both sweeps (reused)")
    parser.add_argument("--parallel", type=int, default=1, help="processes at once per sweep")
    parser.add_argument("--analyze_only", action="store_true", help="train nothing")
    parser.add_argument("--skip_leverage", action="store_true", help="only the ladder")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    sweeps = [(load_sweep(LADDER_CONFIG), os.path.join(root, "ladder"))]
    if not args.skip_leverage:
        sweeps.append((load_sweep(LEVERAGE_CONFIG), os.path.join(root, "leverage")))
    if args.analyze_only:
        try:  # Every sweep is checked before anything (plots, report) is written.
            rows = [_stored_rows(sweep, folder) for sweep, folder in sweeps]
        except (UnfinishedError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        rows = [_run(sweep, folder, args.parallel) for sweep, folder in sweeps]
    unfinished = [r["name"] for sweep_rows in rows for r in sweep_rows if r["state"] != "done"]
    analyze(rows[0], rows[1] if len(rows) > 1 else [], root)
    if unfinished:
        print(f"not finished: {unfinished} (see <root>/<sweep>/<run>/run.log)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
