"""Compile the full train step ahead of time for a TPU topology, from this (CPU) machine.

    python -m experiments.aot --config=experiments/configs/ling_1t.py --topology=v5p-1024
    python -m experiments.aot --config=experiments/configs/ling_1t.py:aot  # verified shape

`--topology` is `<generation>-<chips>` (chips, not TensorCores: v5p-1024 is 1,024 chips) or a
raw shape like `v5p:8x8x16`; without it the config's `aot.topology` is used, which the
pretraining recipes set in their `:aot` variant (the topology, mesh and batch they were verified
on, see `VERIFIED_*` in `experiments/configs/ling_*.py`). Needs libtpu (`pip install -e
'.[tpu]'`), no TPU. Prints per-chip HBM use (parameters, optimizer state, expert biases,
activations and temporaries, generated code) against the chip's capacity, the model FLOPs of
one step, the compiler's FLOP count, a lower bound on the step time, the MFU bound it implies
and the compile time. Exits non-zero if the step does not fit.

The step time is a bound, not a prediction. The compiler's cost analysis counts the body of a
`scan` (the layer stack, micro-batches) once, not once per iteration, so its estimate is far
too low; the model FLOPs (x 4/3 under full remat) at the chips' peak are another lower bound.
The larger of the two is reported, and the MFU from it is an upper bound: communication,
imperfect overlap and kernel efficiency only lower it.
"""

from __future__ import annotations

import math
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ling_jax.model import flops_per_token  # noqa: E402
from ling_jax.parallel.mesh import make_mesh  # noqa: E402
from ling_jax.parallel.topology import tpu_devices  # noqa: E402
from ling_jax.train.optimizer import make_optimizer  # noqa: E402
from ling_jax.train.schedules import make_schedule  # noqa: E402
from ling_jax.train.sharded_state import train_state_shardings  # noqa: E402
from ling_jax.train.train_step import (  # noqa: E402
    BATCH_KEYS,
    batch_sharding,
    jit_train_step,
    make_train_step,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "TPU topology, e.g. v5p-1024 or v5p:8x8x16; default: the config's aot.topology.",
)
flags.mark_flags_as_required(["config"])

GiB = 2**30
# Training FLOPs with full rematerialisation: forward, forward again, backward (2x) = 4/3 x the
# model FLOPs (forward + backward) that MFU counts.
REMAT_RECOMPUTE = 4 / 3


def per_device_bytes(abstract_tree, sharding_tree) -> int:
    """Bytes one device holds of a sharded tree."""
    total = 0
    for leaf, sharding in zip(
        jax.tree.leaves(abstract_tree), jax.tree.leaves(sharding_tree), strict=True
    ):
        total += math.prod(sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def compile_report(config, topology: str) -> dict[str, float]:
    chip, devices = tpu_devices(topology)
    mesh = make_mesh(config.mesh, devices)
    optimizer = make_optimizer(config.optim, make_schedule(config.schedule, config.optim.peak_lr))
    schedule = make_schedule(config.schedule, config.optim.peak_lr)
    graphdef, abstract_state, shardings = train_state_shardings(config.model, optimizer, mesh)
    step = jit_train_step(
        make_train_step(graphdef, optimizer, schedule, config.train, config.optim, config.model),
        mesh=mesh,
        state_shardings=shardings,
    )
    state_arg = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    rows = batch_sharding(mesh)
    shape = (config.train.batch_size, config.data.seq_len)
    batch = {
        key: jax.ShapeDtypeStruct(
            shape, jnp.float32 if key == "loss_mask" else jnp.int32, sharding=rows
        )
        for key in BATCH_KEYS
    }
    start = time.perf_counter()
    lowered = step.lower(state_arg, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}

    params = per_device_bytes(abstract_state.params, shardings.params)
    optimizer_bytes = per_device_bytes(abstract_state.opt_state, shardings.opt_state)
    biases = per_device_bytes(abstract_state.expert_bias, shardings.expert_bias)
    temp = memory.temp_size_in_bytes
    code = memory.generated_code_size_in_bytes
    # Donated state: arguments and outputs share buffers, so count the arguments once.
    total = memory.argument_size_in_bytes + temp + code
    tokens = shape[0] * shape[1]
    model_flops = flops_per_token(config.model, config.data.seq_len).total * tokens
    compiler_flops = float(cost.get("flops", 0.0))  # per device
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    compiler_estimate = float(cost.get("optimal_seconds", 0.0))
    roofline = max(compiler_flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth)
    compiler_seconds = compiler_estimate if compiler_estimate > 0 else roofline
    # The cost analysis counts each scan body once (not per layer / micro-batch), so it can
    # undercount by far; the model FLOPs (with the forward recomputed under full remat) at the
    # chips' peak are a second lower bound on the step time. The larger bound gives the MFU bound.
    hardware_flops = model_flops * (REMAT_RECOMPUTE if config.model.remat == "full" else 1.0)
    compute_seconds = hardware_flops / (len(devices) * chip.peak_flops)
    step_seconds = max(compiler_seconds, compute_seconds)
    return {
        "chips": len(devices),
        "hbm_capacity": chip.hbm_bytes,
        "params": params,
        "optimizer": optimizer_bytes,
        "expert_bias": biases,
        "temp": temp,
        "code": code,
        "total": total,
        "model_flops_per_step": model_flops,
        "compiler_flops_per_chip": compiler_flops,
        "compiler_seconds": compiler_seconds,
        "compiler_time_source": "compiler estimate" if compiler_estimate > 0 else "roofline",
        "compute_seconds": compute_seconds,
        "step_seconds": step_seconds,
        "mfu": model_flops / (len(devices) * chip.peak_flops * step_seconds),
        "mesh": dict(mesh.shape),
        "lower_seconds": lowered_at - start,
        "compile_seconds": compiled_at - lowered_at,
    }


def resolve_topology(config, topology: str | None) -> str:
    """`topology`, else the config's `aot.topology` (set by the recipes' `:aot` variant)."""
    if topology:
        return topology
    default = config.aot.get("topology") if "aot" in config else None
    if not default:
        raise app.UsageError(
            "no --topology and the config names none (aot.topology); e.g. --topology=v5p-64 or "
            "--config=experiments/configs/ling_flash_2.py:aot"
        )
    return default


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    topology = resolve_topology(config, _TOPOLOGY.value)
    report = compile_report(config, topology)
    capacity = report["hbm_capacity"]
    print(f"topology {topology}: {report['chips']} chips, mesh {report['mesh']}")
    per_chip = config.train.batch_size / report["chips"]
    print(
        f"batch {config.train.batch_size} x {config.data.seq_len} tokens per step "
        f"({per_chip:g} sequence(s) per chip, {config.train.micro_batches} micro-batch(es))"
    )
    print("per-chip HBM:")
    for key in ("params", "optimizer", "expert_bias", "temp", "code", "total"):
        label = {"temp": "activations+temporaries", "code": "generated code"}.get(key, key)
        print(f"  {label:<26}{report[key] / GiB:10.2f} GiB")
    print(f"  {'capacity':<26}{capacity / GiB:10.2f} GiB")
    fits = report["total"] <= capacity
    print(f"fits: {'yes' if fits else 'NO'} ({100 * report['total'] / capacity:.1f}% of HBM)")
    print(f"model FLOPs per step: {report['model_flops_per_step']:.4e}")
    print(f"compiler FLOPs per chip: {report['compiler_flops_per_chip']:.4e}")
    print(
        f"compiler step-time estimate: {report['compiler_seconds']:.3f} s "
        f"({report['compiler_time_source']}; scan bodies counted once, so too low)"
    )
    print(
        f"compute bound: {report['compute_seconds']:.3f} s (model FLOPs"
        f"{' x 4/3 for full remat' if config.model.remat == 'full' else ''} at peak)"
    )
    print(f"step time >= {report['step_seconds']:.3f} s (the larger of the two)")
    print(f"estimated_mfu={report['mfu']:.3f} (an upper bound, from that step time)")
    print(f"lowering {report['lower_seconds']:.0f} s, compile {report['compile_seconds']:.0f} s")
    if not fits:
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
