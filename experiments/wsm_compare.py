"""WSM against learning-rate decay on this machine: validation loss, side by side.

    nice -n 10 python -m experiments.wsm_compare --root=runs/wsm_compare [--num_steps=400]

Trains the quickstart model on the same data and tokens three ways (experiments/configs/
wsm_compare.py) and prints their final validation losses:

  wsm     constant LR after warmup, snapshots every 10 steps; the headline WSM model is the
          uniform mean of the last 8 snapshots, i.e. a linear decay emulated over the last 80
          steps, the same window as WSD's decay (SPEC 8: the window matters most);
  wsd     the same run branched at step 320 (the two schedules agree until then) and decayed
          with 1-sqrt to 0 over the last 80 steps (20%);
  cosine  its own run, cosine to 0.

Other merges of the same WSM snapshots (window, count, weights) follow as an ablation; they are
chosen after the fact, so only the headline merge counts for the final line
`wsm_minus_best_decay=<wsm - min(wsd, cosine)>` (negative: WSM is better). Every step runs the
public commands, printed as they run; work already done in --root is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from experiments.configs import wsm_compare
from ling_jax.train.metrics import read_metrics

CONFIG = "experiments/configs/wsm_compare.py"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (label, number of snapshots, spacing in steps, weights); the first is the headline.
MERGES = (
    ("mean 8 x 10", 8, 10, "linear"),
    ("1-sqrt 8 x 10", 8, 10, "1-sqrt"),
    ("cosine 8 x 10", 8, 10, "cosine"),
    ("mean 4 x 20", 4, 20, "linear"),
    ("mean 2 x 40", 2, 40, "linear"),
    ("mean 16 x 10", 16, 10, "linear"),
    ("mean 8 x 20", 8, 20, "linear"),
)


def final_eval_loss(workdir: str, step: int) -> float | None:
    records = [r for r in read_metrics(workdir) if r["step"] == step and "eval/loss" in r]
    return records[-1]["eval/loss"] if records else None


def final_eval_loss_or_none(workdir: str, step: int) -> float | None:
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return None
    return final_eval_loss(workdir, step)


class Runner:
    """Runs commands once: their wall times are kept in <root>/timings.json for reruns."""

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, "timings.json")
        self.timings = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.timings = json.load(f)

    def run(self, name: str, args: list[str]) -> None:
        command = " ".join(args)
        print(f"$ {command}", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True)
        self.timings[name] = {"command": command, "seconds": time.perf_counter() - start}
        with open(self.path, "w") as f:
            json.dump(self.timings, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="folder of the runs (reused if present)")
    parser.add_argument("--num_steps", type=int, default=wsm_compare.NUM_STEPS)
    parser.add_argument("--skip_ablation", action="store_true")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    runner = Runner(root)
    steps = args.num_steps
    config = {k: f"--config={CONFIG}:{k},{steps}" for k in ("wsm", "wsd", "cosine")}
    workdir = {k: os.path.join(root, k) for k in ("wsm", "wsd", "cosine")}

    def train(kind: str) -> None:
        if final_eval_loss_or_none(workdir[kind], steps) is None:
            runner.run(kind, ["experiments.run", config[kind], f"--workdir={workdir[kind]}"])

    train("wsm")
    branch = wsm_compare.branch_step(wsm_compare.get_config(f"wsd,{steps}"))
    if not os.path.isdir(os.path.join(workdir["wsd"], "checkpoints")):
        print(f"wsd branches from {workdir['wsm']} at step {branch}", flush=True)
        for sub in (f"checkpoints/{branch}", "tokenizer"):
            shutil.copytree(os.path.join(workdir["wsm"], sub), os.path.join(workdir["wsd"], sub))
    train("wsd")
    train("cosine")

    merges = MERGES[:1] if args.skip_ablation else MERGES
    merged = {}
    for label, count, spacing, shape in merges:
        output = os.path.join(root, f"merged_{shape}_{count}x{spacing}")
        if final_eval_loss_or_none(output, steps) is None:
            runner.run(
                label,
                [
                    "experiments.merge",
                    config["wsm"],
                    f"--workdir={workdir['wsm']}",
                    f"--output={output}",
                    f"--last={count}",
                    f"--every={spacing}",
                    f"--shape={shape}",
                    "--evaluate",
                ],
            )
        merged[label] = final_eval_loss(output, steps)

    rows = [
        ("cosine (decay to 0)", final_eval_loss(workdir["cosine"], steps), "cosine"),
        (
            f"wsd (1-sqrt to 0, last {steps - branch} steps)",
            final_eval_loss(workdir["wsd"], steps),
            "wsd",
        ),
        ("wsm, constant LR, no merge", final_eval_loss(workdir["wsm"], steps), "wsm"),
    ]
    rows += [(f"wsm merge: {label}", loss, label) for label, loss in merged.items()]
    print(f"\nvalidation loss at step {steps} (eval/loss, nats/token):")
    for name, loss, key in rows:
        seconds = runner.timings.get(key, {}).get("seconds")
        took = f"{seconds / 60:6.1f} min" if seconds is not None else "      -"
        print(f"  {name:<40s} {loss:.4f}   {took}")
    logged = {
        r["step"]: r["eval/merged_loss"]
        for r in read_metrics(workdir["wsm"])
        if "eval/merged_loss" in r
    }
    if steps in logged:  # the trainer's own merged eval: the headline merge, computed in-run
        print(f"  (wsm run's eval/merged_loss at step {steps}: {logged[steps]:.4f})")
    best_decay = min(rows[0][1], rows[1][1])
    delta = merged[MERGES[0][0]] - best_decay
    print(f"wsm_minus_best_decay={delta:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
