"""A sweep's results as a table: one row per point, from each run's `metrics.jsonl`.

Rows are plain dicts (`pandas.DataFrame(rows)` or `to_dataframe`), written to
`<root>/results.csv` and `<root>/results.json`. Columns: `name`, `state`, the point's tags,
`num_steps`, `last_step`, `eval_loss` (validation loss at the last step; NaN until done),
`eval_bits_per_byte`, `train_ce` (the last logged training cross-entropy), `wall_seconds`
(the run's logged uptime) and `eval_curve` (step -> validation loss, JSON only).
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from experiments.sweeps.runner import point_status
from experiments.sweeps.spec import Sweep
from ling_jax.io import paths
from ling_jax.train.metrics import METRICS_FILE, read_metrics

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"


def _last(records: list[dict], key: str, step: int | None = None) -> float:
    values = [r[key] for r in records if key in r and (step is None or r["step"] == step)]
    return float(values[-1]) if values else math.nan


def collect(sweep: Sweep, root: str) -> list[dict[str, Any]]:
    """One row per point (pending points included, with NaN results)."""
    rows = []
    for point in sweep.points:
        status = point_status(point, root)
        row: dict[str, Any] = {"name": point.name, "state": status.state, **point.tags}
        row.update(num_steps=status.num_steps, last_step=status.last_step)
        workdir = paths.join(root, point.name)
        records = read_metrics(workdir) if paths.exists(paths.join(workdir, METRICS_FILE)) else []
        row["eval_loss"] = _last(records, "eval/loss", status.num_steps)
        row["eval_bits_per_byte"] = _last(records, "eval/bits_per_byte", status.num_steps)
        row["train_ce"] = _last(records, "train/ce")
        row["wall_seconds"] = _last(records, "uptime")
        row["eval_curve"] = {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r}
        rows.append(row)
    return rows


def write_results(rows: list[dict[str, Any]], root: str) -> tuple[str, str]:
    """Writes results.csv (scalar columns) and results.json (everything); returns the paths."""
    paths.makedirs(root)
    csv_path, json_path = paths.join(root, RESULTS_CSV), paths.join(root, RESULTS_JSON)
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, dict)]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths.write_text(csv_path, table.getvalue())
    paths.write_text(json_path, json.dumps(rows, indent=2, default=str))
    return csv_path, json_path


def read_results(root: str) -> list[dict[str, Any]]:
    """The rows of `<root>/results.json` (eval curves keyed by int steps again)."""
    path = paths.join(root, RESULTS_JSON)
    if not paths.exists(path):
        raise FileNotFoundError(f"{path} not found: run the sweep (or collect it) first")
    rows = json.loads(paths.read_text(path))
    for row in rows:
        row["eval_curve"] = {int(k): v for k, v in row.get("eval_curve", {}).items()}
    return rows


def to_dataframe(rows: list[dict[str, Any]]):
    """The rows as a pandas DataFrame indexed by point name."""
    import pandas as pd

    return pd.DataFrame(rows).set_index("name")


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A fixed-width text table of the given columns (floats to 4 significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
