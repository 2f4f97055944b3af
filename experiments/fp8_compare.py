"""FP8 against BF16 training on this machine: the relative loss gap and the FP8 safeguards.

    nice -n 10 python -m experiments.fp8_compare --root=runs/fp8_compare [--num_steps=200]

Trains the same model on the same data, seed and tokens twice (experiments/configs/
fp8_compare.py), once in BF16 and once with `fp8.enabled=True`, then prints

  * the relative gap (fp8 - bf16) / bf16 of the training loss (means over each logging window)
    and of the validation loss at every evaluation, and at the end (SPEC section 9: the 1T
    model stayed within 0.25%);
  * the FP8 run's safeguard statistics per layer and op at its last probe, with the extremes
    over the run.

Every run is a public `experiments.run` command, printed as it runs; finished runs in --root are
reused. The final line is `final_relative_gap=<eval gap at the last step>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

from experiments.configs import fp8_compare
from experiments.wsm_compare import Runner
from ling_jax.train.metrics import read_metrics

CONFIG = "experiments/configs/fp8_compare.py"


def _series(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


def relative_gaps(bf16: dict[int, float], fp8: dict[int, float]) -> dict[int, float]:
    """(fp8 - bf16) / bf16 at every step both runs logged."""
    return {s: (fp8[s] - bf16[s]) / bf16[s] for s in sorted(set(bf16) & set(fp8))}


def safeguard_table(records: list[dict]) -> tuple[int, dict, dict]:
    """(last probe step, {(layer, op): {stat/tensor: value}} there, extremes over the run)."""
    probes = [r for r in records if "fp8/underflow/max" in r]
    if not probes:
        return 0, {}, {}
    last = probes[-1]
    table: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for name, value in last.items():
        parts = name.split("/")
        if len(parts) == 5 and parts[0] == "fp8":
            _, stat, layer, op, tensor = parts
            table[(layer, op)][f"{stat}/{tensor}"] = value
    extremes = {
        "max underflow": max(r["fp8/underflow/max"] for r in probes),
        "min distortion (cosine)": min(r["fp8/distortion/min"] for r in probes),
    }
    return last["step"], dict(sorted(table.items())), extremes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="folder of the runs (reused if present)")
    parser.add_argument("--num_steps", type=int, default=fp8_compare.NUM_STEPS)
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    runner = Runner(root)
    steps = args.num_steps
    workdir = {p: os.path.join(root, p) for p in fp8_compare.PRECISIONS}
    for precision in fp8_compare.PRECISIONS:
        path = os.path.join(workdir[precision], "metrics.jsonl")
        done = os.path.exists(path) and any(
            r["step"] == steps and "eval/loss" in r for r in read_metrics(workdir[precision])
        )
        if not done:
            runner.run(
                precision,
                [
                    "experiments.run",
                    f"--config={CONFIG}:{precision},{steps}",
                    f"--workdir={workdir[precision]}",
                ],
            )

    records = {p: read_metrics(workdir[p]) for p in fp8_compare.PRECISIONS}
    train = relative_gaps(*(_series(records[p], "train/loss") for p in fp8_compare.PRECISIONS))
    evals = {p: _series(records[p], "eval/loss") for p in fp8_compare.PRECISIONS}
    eval_gap = relative_gaps(evals["bf16"], evals["fp8"])

    print("\nvalidation loss (eval/loss, nats/token) and relative gap (fp8 - bf16) / bf16:")
    print(f"  {'step':>5s} {'bf16':>8s} {'fp8':>8s} {'gap':>9s}")
    for step, gap in eval_gap.items():
        print(f"  {step:5d} {evals['bf16'][step]:8.4f} {evals['fp8'][step]:8.4f} {gap:+9.4%}")
    train_gaps = list(train.values())
    late = train_gaps[len(train_gaps) // 2 :]
    mean = sum(train_gaps) / len(train_gaps)
    print(
        f"training loss gap over {len(train_gaps)} logging windows: mean {mean:+.4%}, "
        f"second half mean {sum(late) / len(late):+.4%}, "
        f"max |gap| {max(map(abs, train_gaps)):.4%}, last {train_gaps[-1]:+.4%}"
    )
    for precision in fp8_compare.PRECISIONS:
        seconds = runner.timings.get(precision, {}).get("seconds")
        if seconds is not None:
            print(f"  {precision} run: {seconds / 60:.1f} min")

    step, table, extremes = safeguard_table(records["fp8"])
    if table:
        print(
            f"\nFP8 safeguards at step {step} (underflow: fraction of non-zero elements "
            "quantized to 0; distortion: cosine with the round trip):"
        )
        columns = ("underflow/input", "underflow/weight", "distortion/input", "distortion/weight")
        print(f"  {'layer':<9s} {'op':<16s} " + " ".join(f"{c:>17s}" for c in columns))
        for (layer, op), stats in table.items():
            cells = " ".join(f"{stats.get(c, float('nan')):17.6f}" for c in columns)
            print(f"  {layer:<9s} {op:<16s} {cells}")
        for name, value in extremes.items():
            print(f"  over the run: {name} = {value:.6f}")

    final = eval_gap[max(eval_gap)]
    summary = {
        "eval_gap": eval_gap,
        "train_gap": train,
        "final_relative_gap": final,
        "safeguards_step": step,
        "safeguard_extremes": extremes,
        "timings": runner.timings,
    }
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"final_relative_gap={final:+.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
