"""Compile the full train step ahead of time for a TPU topology, from this (CPU) machine.

    python -m experiments.aot --config=experiments/configs/ling_1t.py --topology=v5p-1024

`--topology` is `<generation>-<chips>` (chips, not TensorCores: v5p-1024 is 1,024 chips) or a
raw shape like `v5p:8x8x16`. Needs libtpu (`pip install -e '.[tpu]'`), no TPU. Prints per-chip
HBM use (parameters, optimizer state, expert biases, activations and temporaries, generated
code) against the chip's capacity, the model FLOPs of one step, the compiler's FLOP count,
an estimated step time and the MFU it implies. Exits non-zero if the step does not fit.
"""

from __future__ import annotations

import math
import os

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
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p-1024 or v5p:8x8x16.")
flags.mark_flags_as_required(["config", "topology"])

GiB = 2**30


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
    compiled = step.lower(state_arg, batch).compile()
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
    roofline = max(compiler_flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth)
    compiler_estimate = float(cost.get("optimal_seconds", 0.0))
    step_seconds = compiler_estimate if compiler_estimate > 0 else roofline
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
        "step_seconds": step_seconds,
        "step_time_source": "compiler estimate" if compiler_estimate > 0 else "roofline",
        "mfu": model_flops / (len(devices) * chip.peak_flops * step_seconds) if step_seconds else 0,
        "mesh": dict(mesh.shape),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    report = compile_report(config, _TOPOLOGY.value)
    capacity = report["hbm_capacity"]
    print(f"topology {_TOPOLOGY.value}: {report['chips']} chips, mesh {report['mesh']}")
    print(f"batch {config.train.batch_size} x {config.data.seq_len} tokens per step")
    print("per-chip HBM:")
    for key in ("params", "optimizer", "expert_bias", "temp", "code", "total"):
        label = {"temp": "activations+temporaries", "code": "generated code"}.get(key, key)
        print(f"  {label:<26}{report[key] / GiB:10.2f} GiB")
    print(f"  {'capacity':<26}{capacity / GiB:10.2f} GiB")
    fits = report["total"] <= capacity
    print(f"fits: {'yes' if fits else 'NO'} ({100 * report['total'] / capacity:.1f}% of HBM)")
    print(f"model FLOPs per step: {report['model_flops_per_step']:.4e}")
    print(f"compiler FLOPs per chip: {report['compiler_flops_per_chip']:.4e}")
    print(f"estimated step time: {report['step_seconds']:.3f} s ({report['step_time_source']})")
    print(f"estimated_mfu={report['mfu']:.3f}")
    if not fits:
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
