"""The paper's wind tunnel for TPU pods: five Ling-shaped MoE runs from 0.5B to 8B parameters.

    python -m experiments.sweep --config=experiments/configs/wind_tunnel_pod.py \\
        --root=gs://BUCKET/wind_tunnel \\
        --set=data.train_files='gs://BUCKET/pretrain/*.arrayrecord' \\
        --set=data.tokenizer=/path/to/Ling-mini-2.0/tokenizer.json \\
        --tpu_args="--zone=us-east5-a --accelerator=v5p-64"          # one launch.tpu command each
    python -m experiments.wind_tunnel --root=... --analyze_only      # (after copying results)

SPEC 7.3: model sizes spaced by a power law (budgets x3.15 apart, 1.4e18 to 1.4e20 FLOPs, i.e.
0.58B, 1.2B, 2.0B, 3.8B and 8.3B total parameters), each shaped by `ling_jax.scaling.plan` with
Ling 2.0's sparsity (256 experts, top-8 + 1 shared, A = 3.5%, G = 8), trained for D_opt(C)
tokens at eta_opt(C) and B_opt(C) (4K sequences, Ling's 157,184-token vocabulary), with the
ladder protocol's schedule (1% warmup, exponential decay to 10% over the last 10%). Compute
and memory settings follow the 1T pretraining recipe: bf16 compute, fp32 master weights, full
remat, FSDP within a slice and data parallel across slices.
"""

from __future__ import annotations

import ml_collections

from experiments.sweeps.spec import Sweep
from experiments.sweeps.wind_tunnel import Ladder
from ling_jax.scaling.planner import plan

CONFIG_FILE = "experiments/configs/wind_tunnel_pod.py"
SEQ_LEN = 4096
VOCAB = 157184
BUDGETS = {f"c{i}": 1.4e18 * 3.15**i for i in range(5)}  # 0.5B ... 8B total parameters
OVERRIDES = {
    "model.dtype": "bfloat16",
    "model.param_dtype": "float32",
    "model.remat": "full",
    "data.source": "files",  # Bring your own data: --set=data.train_files=...
    "optim.bias_update_rate": 1e-3,
    "eval.max_batches": 64,
    "logging.log_every_steps": 10,
    "mesh.ici.data": 1,
    "mesh.ici.fsdp": -1,
    "mesh.dcn.data": -1,
}


def ladder() -> Ladder:
    plans = {name: plan(c, seq_len=SEQ_LEN, vocab_size=VOCAB) for name, c in BUDGETS.items()}
    return Ladder(plans, warmup_fraction=0.01, overrides=OVERRIDES)


def get_config(rung: str = "c0") -> ml_collections.ConfigDict:
    """The experiment config of one rung, with placeholder data (set data.train_files)."""
    return ladder().experiment_config(rung, validate=False)


def get_sweep() -> Sweep:
    return ladder().sweep("wind_tunnel_pod", CONFIG_FILE)
