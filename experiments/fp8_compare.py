"""FP8 against BF16 training on this machine: the relative loss gap and the FP8 safeguards.

    nice -n 10 python -m experiments.fp8_compare --root=runs/fp8_compare [--num_steps=200]

Trains the same model on the same data, seed and tokens twice (experiments/configs/
fp8_compare.py), once in BF16 and once with `fp8.enabled=True`, then prints

  * the relative gap (fp8 - bf16) / bf16 of the training loss (means over each logging window)
    and of the validation loss at every evaluation, and at the end (SPEC section 9: the 1T
    model stayed within 0.25%);
  * the FP8 run's safeguard statistics per layer and op at its last probe, with the extremes
    over the run;
  * the gap of the same final weights evaluated with the BF16 and with the FP8 forward pass;
  * with --control, the same gaps for `bf16_reordered`, a BF16 run with another fp32 rounding
    order (chunked attention): how far two runs drift apart from rounding alone;
  * with --seeds=0,1,2, every run once per seed (init and data order; runs `<name>_seed<s>`
    beside the seed-0 runs `<name>`), and the final gap of each pair with the mean over seeds
    and its standard error. The tables along the run, the same-weights check and the
    safeguards are those of seed 0.

Every run is a public `experiments.run` command, printed as it runs; finished runs in --root are
reused. The final line is `final_relative_gap=<eval gap at the last step>` (the mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def seed_gap_summary(gaps: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-seed gaps; the error is 0 for one seed."""
    n = len(gaps)
    mean = sum(gaps) / n
    if n < 2:
        return mean, 0.0
    variance = sum((g - mean) ** 2 for g in gaps) / (n - 1)
    return mean, (variance / n) ** 0.5


def run_name(precision: str, seed: int) -> str:
    return precision if seed == 0 else f"{precision}_seed{seed}"


def _finished(workdir: str, steps: int) -> bool:
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return False
    return any(r["step"] == steps and "eval/loss" in r for r in read_metrics(workdir))


def _summary(name: str, gaps: dict[int, float]) -> str:
    values = list(gaps.values())
    late = values[len(values) // 2 :]
    return (
        f"  {name}: mean {sum(values) / len(values):+.4%}, second half mean "
        f"{sum(late) / len(late):+.4%}, max |gap| {max(map(abs, values)):.4%}, "
        f"last {values[-1]:+.4%}"
    )


def cross_evaluate(runner: Runner, root: str, source: str, precision: str, steps: int) -> float:
    """eval/loss of run `source`'s final weights with the forward pass of `precision`.

    The snapshot is copied into a fresh workdir and `experiments.run` at the same step only
    evaluates it: the fp8 fields are runtime-only, so either precision resumes any snapshot.
    """
    name = f"{source}_weights_{precision}_forward"
    workdir = os.path.join(root, name)
    if not _finished(workdir, steps):
        for sub in (f"checkpoints/{steps}", "tokenizer"):
            if not os.path.exists(os.path.join(workdir, sub)):
                shutil.copytree(os.path.join(root, source, sub), os.path.join(workdir, sub))
        config = f"--config={CONFIG}:{precision},{steps}"
        runner.run(name, ["experiments.run", config, f"--workdir={workdir}"])
    return _series(read_metrics(workdir), "eval/loss")[steps]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="folder of the runs (reused if present)")
    parser.add_argument("--num_steps", type=int, default=fp8_compare.NUM_STEPS)
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run bf16_reordered (BF16, another rounding order): the noise floor",
    )
    parser.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds (init and data order); every run is made once per seed",
    )
    args = parser.parse_args(argv)
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",")})
    except ValueError:
        parser.error(f"--seeds={args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    if seeds[0] != 0:
        parser.error(f"--seeds={args.seeds!r} must include 0 (the reference pair)")
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    runner = Runner(root)
    steps = args.num_steps
    runs = (
        (*fp8_compare.PRECISIONS, fp8_compare.CONTROL) if args.control else fp8_compare.PRECISIONS
    )
    for seed in seeds:
        for run in runs:
            name = run_name(run, seed)
            if not _finished(os.path.join(root, name), steps):
                config = f"--config={CONFIG}:{run},{steps},{seed}"
                runner.run(name, ["experiments.run", config, f"--workdir={root}/{name}"])
    workdir = {p: os.path.join(root, p) for p in runs}

    records = {p: read_metrics(workdir[p]) for p in runs}
    evals = {p: _series(records[p], "eval/loss") for p in runs}
    trains = {p: _series(records[p], "train/loss") for p in runs}
    compared = [p for p in runs if p != "bf16"]
    eval_gap = {p: relative_gaps(evals["bf16"], evals[p]) for p in compared}
    train_gap = {p: relative_gaps(trains["bf16"], trains[p]) for p in compared}

    print("\nvalidation loss (eval/loss, nats/token) and relative gap (run - bf16) / bf16:")
    print(f"  {'step':>5s} {'bf16':>8s} " + " ".join(f"{p:>14s} {'gap':>9s}" for p in compared))
    for step in eval_gap["fp8"]:
        cells = " ".join(
            f"{evals[p][step]:14.4f} {eval_gap[p][step]:+9.4%}"
            for p in compared
            if step in eval_gap[p]
        )
        print(f"  {step:5d} {evals['bf16'][step]:8.4f} {cells}")
    print("relative gap of the eval loss / of the training loss (means over logging windows):")
    for p in compared:
        print(_summary(f"{p} eval ", eval_gap[p]))
        print(_summary(f"{p} train", train_gap[p]))
    for run in runs:
        seconds = runner.timings.get(run, {}).get("seconds")
        if seconds is not None:
            print(f"  {run} run: {seconds / 60:.1f} min")

    seed_gaps = {}
    for p in compared:
        seed_gaps[p] = []
        for seed in seeds:
            final_losses = {
                q: _series(read_metrics(os.path.join(root, run_name(q, seed))), "eval/loss")[steps]
                for q in ("bf16", p)
            }
            seed_gaps[p].append((final_losses[p] - final_losses["bf16"]) / final_losses["bf16"])
    if len(seeds) > 1:
        print(f"\nfinal eval-loss gap to bf16 at step {steps}, per seed {seeds}:")
        for p in compared:
            mean, stderr = seed_gap_summary(seed_gaps[p])
            cells = " ".join(f"{g:+.4%}" for g in seed_gaps[p])
            print(f"  {p:>14s}: {cells} | mean {mean:+.4%} +- {stderr:.4%} (standard error)")

    # The same weights through both forward passes: FP8's own effect on the loss, free of
    # the drift between two training trajectories.
    print(f"\nsame weights, BF16 and FP8 forward passes (eval/loss at step {steps}):")
    forward_gap = {}
    for source in fp8_compare.PRECISIONS:
        other = "fp8" if source == "bf16" else "bf16"
        losses = {source: evals[source][steps]}
        losses[other] = cross_evaluate(runner, root, source, other, steps)
        forward_gap[source] = (losses["fp8"] - losses["bf16"]) / losses["bf16"]
        print(
            f"  {source} weights: bf16 forward {losses['bf16']:.4f}, fp8 forward "
            f"{losses['fp8']:.4f}, gap {forward_gap[source]:+.4%}"
        )

    step, table, extremes = safeguard_table(records["fp8"])
    if table:
        print(
            f"\nFP8 safeguards at step {step} (underflow: fraction of non-zero elements "
            "quantized to 0; distortion: cosine with the round trip):"
        )
        present = {c for stats in table.values() for c in stats}
        columns = [
            f"{stat}/{tensor}"
            for stat in ("underflow", "distortion")
            for tensor in ("input", "weight", "grad")
            if f"{stat}/{tensor}" in present
        ]
        print(f"  {'layer':<9s} {'op':<16s} " + " ".join(f"{c:>17s}" for c in columns))
        for (layer, op), stats in table.items():
            cells = " ".join(f"{stats.get(c, float('nan')):17.6f}" for c in columns)
            print(f"  {layer:<9s} {op:<16s} {cells}")
        for name, value in extremes.items():
            print(f"  over the run: {name} = {value:.6f}")

    final, final_stderr = seed_gap_summary(seed_gaps["fp8"])
    summary = {
        "seeds": seeds,
        "final_gap_per_seed": seed_gaps,
        "final_gap_stderr": final_stderr,
        "eval_gap": eval_gap,
        "train_gap": train_gap,
        "final_relative_gap": final,
        "same_weights_forward_gap": forward_gap,
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
