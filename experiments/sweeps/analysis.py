"""Fits, predictions and plots of sweep results (rows from `experiments.sweeps.results`).

    prediction = predict_largest(rows)       # fit all but the largest run, predict it
    plot_loss_vs_compute(rows, prediction.fit, "loss_vs_compute.png", target=prediction)
    leverage = measure_leverage(moe_rows, dense_rows)
    plot_leverage(leverage, "el_vs_activation.png")

Losses are final validation losses (`eval_loss`, nats per token) against training compute
(`compute`, FLOPs = M x D). Plots are matplotlib PNGs (Agg backend, no display needed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ling_jax.scaling import laws
from ling_jax.scaling.fitting import (
    EfficiencyLeverage,
    PowerLawFit,
    fit_efficiency_leverage,
    fit_power_law,
)

Row = dict[str, Any]


def finished(rows: Sequence[Row]) -> list[Row]:
    """Rows with a final validation loss, ordered by compute."""
    done = [r for r in rows if r.get("state") == "done" and math.isfinite(r["eval_loss"])]
    return sorted(done, key=lambda r: r["compute"])


def finished_computes(rows: Sequence[Row]) -> list[float]:
    """The distinct computes of the finished rows (seeds of one rung share one), ascending."""
    return sorted({r["compute"] for r in finished(rows)})


@dataclasses.dataclass(frozen=True)
class LadderPrediction:
    """The fit of the smaller runs and its prediction for a held-out larger one.

    With several seeds per rung the fit uses every run of the smaller rungs (so it follows
    their means) and `measured` is the mean over the largest rung's runs (`measured_runs`).
    """

    fit: PowerLawFit
    fit_names: list[str]
    target_name: str
    target_compute: float
    predicted: float
    lower: float
    upper: float
    measured: float
    confidence: float
    measured_runs: list[float] = dataclasses.field(default_factory=list)

    @property
    def error(self) -> float:
        """measured - predicted, in nats."""
        return self.measured - self.predicted

    def describe(self) -> str:
        f = self.fit
        runs = self.measured_runs
        spread = (
            f" (mean of {len(runs)} seeds: {', '.join(f'{x:.4f}' for x in runs)})"
            if len(runs) > 1
            else ""
        )
        return (
            f"fit on {', '.join(self.fit_names)}: L(C) = {f.a:.4g} C^-{f.b:.4f}"
            + (f" + {f.c:.4g}" if f.irreducible else "")
            + f" (b = {f.b:.4f} +- {f.stderr['b']:.4f})\n"
            f"{self.target_name} at C = {self.target_compute:.3g}: predicted "
            f"{self.predicted:.4f} [{self.lower:.4f}, {self.upper:.4f}] "
            f"({self.confidence:.0%} prediction interval), measured {self.measured:.4f}"
            f"{spread}, error {self.error:+.4f} nats"
        )


def predict_largest(
    rows: Sequence[Row], *, irreducible: bool = False, confidence: float = 0.95
) -> LadderPrediction:
    """Fits L(C) on every finished run below the largest compute and predicts the mean final
    loss of the runs at the largest compute (one per seed)."""
    done = finished(rows)
    if len(finished_computes(done)) < 4:
        raise ValueError(
            f"predict_largest needs finished runs at >= 4 computes (3 to fit, 1 to predict), "
            f"got {[r['name'] for r in done]}"
        )
    largest = done[-1]["compute"]
    fit_rows = [r for r in done if r["compute"] != largest]
    targets = [r for r in done if r["compute"] == largest]
    fit = fit_power_law(
        [r["compute"] for r in fit_rows], [r["eval_loss"] for r in fit_rows], irreducible
    )
    band = fit.predict(largest, confidence, observation_noise=True, num_observations=len(targets))
    losses = [float(r["eval_loss"]) for r in targets]
    return LadderPrediction(
        fit=fit,
        fit_names=[r["name"] for r in fit_rows],
        target_name=targets[0].get("rung", targets[0]["name"]),
        target_compute=float(largest),
        predicted=float(band.mean),
        lower=float(band.lower),
        upper=float(band.upper),
        measured=float(np.mean(losses)),
        confidence=confidence,
        measured_runs=losses,
    )


@dataclasses.dataclass(frozen=True)
class MeasuredLeverage:
    """EL of a MoE family over a dense one at the MoE runs' compute, and the law's value."""

    leverage: EfficiencyLeverage
    activation_ratio: float
    granularity: float
    moe_names: list[str]
    dense_names: list[str]

    @property
    def predicted(self) -> np.ndarray:
        """The joint law EL(A, G, C) at each MoE compute."""
        return np.asarray(
            laws.efficiency_leverage(self.activation_ratio, self.granularity, self.leverage.compute)
        )

    def describe(self) -> str:
        lines = [
            f"MoE (A = {self.activation_ratio:.2%}, G = {self.granularity:g}) over dense; "
            f"loss fits: MoE b = {self.leverage.moe.b:.4f}, dense b = {self.leverage.dense.b:.4f}"
        ]
        for c, v, lo, hi, law in zip(
            self.leverage.compute,
            np.atleast_1d(self.leverage.value),
            np.atleast_1d(self.leverage.lower),
            np.atleast_1d(self.leverage.upper),
            np.atleast_1d(self.predicted),
            strict=True,
        ):
            lines.append(f"  C = {c:.3g}: measured EL {v:.2f} [{lo:.2f}, {hi:.2f}], law {law:.2f}")
        return "\n".join(lines)


def measure_leverage(
    moe_rows: Sequence[Row], dense_rows: Sequence[Row], *, confidence: float = 0.95
) -> MeasuredLeverage:
    """EL = C_dense / C_moe at equal loss, from pure power-law fits of each family."""
    moe, dense = finished(moe_rows), finished(dense_rows)
    if len(moe) < 3 or len(dense) < 3:
        raise ValueError(
            f"measure_leverage needs >= 3 finished runs per family, got MoE "
            f"{[r['name'] for r in moe]} and dense {[r['name'] for r in dense]}"
        )
    ratios = {round(r["activation_ratio"], 6) for r in moe}
    grains = {round(r["granularity"], 6) for r in moe}
    if len(ratios) != 1 or len(grains) != 1:
        raise ValueError(f"MoE runs mix shapes: activation ratios {ratios}, granularities {grains}")
    leverage = fit_efficiency_leverage(
        ([r["compute"] for r in moe], [r["eval_loss"] for r in moe]),
        ([r["compute"] for r in dense], [r["eval_loss"] for r in dense]),
        [r["compute"] for r in moe],
        confidence=confidence,
    )
    return MeasuredLeverage(
        leverage=leverage,
        activation_ratio=moe[0]["activation_ratio"],
        granularity=moe[0]["granularity"],
        moe_names=[r["name"] for r in moe],
        dense_names=[r["name"] for r in dense],
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_log_log(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> str:
    """Log-log axes, labels, grid and legend; writes the PNG and closes the figure."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_loss_vs_compute(
    series: dict[str, Sequence[Row]],
    path: str,
    *,
    fits: dict[str, PowerLawFit] | None = None,
    prediction: LadderPrediction | None = None,
    confidence: float = 0.95,
    title: str = "validation loss vs training compute",
) -> str:
    """Log-log loss vs compute: each series' runs, its fit with a band, the held-out target."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    all_c = [r["compute"] for rows in series.values() for r in finished(rows)]
    span = np.geomspace(min(all_c) / 1.5, max(all_c) * 3.0, 100)
    for i, (label, rows) in enumerate(series.items()):
        color = f"C{i}"
        done = finished(rows)
        ax.scatter(
            [r["compute"] for r in done],
            [r["eval_loss"] for r in done],
            color=color,
            label=f"{label} runs",
            zorder=3,
        )
        for r in done:
            ax.annotate(
                r["name"],
                (r["compute"], r["eval_loss"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        fit = (fits or {}).get(label)
        if fit is not None:
            band = fit.predict(span, confidence)
            ax.plot(
                span,
                band.mean,
                color=color,
                lw=1.2,
                label=f"{label} fit: {fit.a:.3g} C^-{fit.b:.3f}"
                + (f" + {fit.c:.3g}" if fit.irreducible else ""),
            )
            ax.fill_between(
                span,
                band.lower,
                band.upper,
                color=color,
                alpha=0.15,
                label=f"{confidence:.0%} band",
            )
    if prediction is not None:
        ax.errorbar(
            [prediction.target_compute],
            [prediction.predicted],
            yerr=[
                [prediction.predicted - prediction.lower],
                [prediction.upper - prediction.predicted],
            ],
            fmt="x",
            color="k",
            capsize=4,
            zorder=4,
            label=f"predicted {prediction.target_name}: {prediction.predicted:.3f}",
        )
        ax.scatter(
            [prediction.target_compute],
            [prediction.measured],
            marker="*",
            s=120,
            color="C3",
            zorder=5,
            label=f"measured {prediction.target_name}: {prediction.measured:.3f}",
        )
    return _save_log_log(
        fig,
        ax,
        path,
        "training compute C (FLOPs, non-embedding)",
        "final validation loss (nats/token)",
        title,
    )


def plot_leverage(measured: Sequence[MeasuredLeverage], path: str, *, compute: float) -> str:
    """EL vs activation ratio: the law at `compute` (and at 1e22) with the measured points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ratios = np.geomspace(0.005, 0.5, 100)
    grains = sorted({m.granularity for m in measured})
    for i, g in enumerate(grains):
        for c, style in ((compute, "-"), (1e22, ":")):
            ax.plot(
                ratios,
                laws.efficiency_leverage(ratios, g, c),
                style,
                color=f"C{i}",
                label=f"law, G = {g:g}, C = {c:.0e}",
            )
    for m in measured:
        i = grains.index(m.granularity)
        value, lo, hi = (
            np.atleast_1d(x)[-1] for x in (m.leverage.value, m.leverage.lower, m.leverage.upper)
        )
        c = np.atleast_1d(m.leverage.compute)[-1]
        ax.errorbar(
            [m.activation_ratio],
            [value],
            yerr=[[value - lo], [hi - value]],
            fmt="o",
            color=f"C{i}",
            capsize=4,
            zorder=4,
            label=f"measured at C = {c:.2g}: {value:.2f}",
        )
    ax.axhline(1.0, color="gray", lw=0.8)
    return _save_log_log(
        fig,
        ax,
        path,
        "activation ratio A",
        "efficiency leverage (C_dense / C_MoE at equal loss)",
        "efficiency leverage vs activation ratio",
    )
