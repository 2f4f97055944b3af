"""What the expert-parallel token exchange costs, read from the compiled program of ONE MoE layer.

    python -m benchmarks.ep_dispatch_hlo                       # Ling-1T layer, v5p-1024, EP 8
    python -m benchmarks.ep_dispatch_hlo --experts_per_device=8 --dispatch=ragged

Compiles the forward + backward of one Ling-1T MoE layer ahead of time (libtpu, no TPU) on the
1T recipe's verified topology and mesh (`experiments/configs/ling_1t.py:aot`: v5p-1024, EP 8 x
FSDP 128, one 4K sequence per chip), once per `moe.ep_dispatch`, and prints per chip:

  * every collective's data-operand bytes from the compiled HLO. A ragged-all-to-all's operand
    is a static buffer of which only the routed rows travel; the rows that do travel under
    balanced routing are printed next to it.
  * the expert grouped-matmul FLOPs: the dots inside the "xla" backend's tile loop, from the
    lowered StableHLO (per iteration), times the loop's trip count. XLA's cost analysis counts
    a loop body once, so the trip count is computed here: all chunks for a static loop (a
    `scan`, the code before the ragged dispatch), the chunks holding used tiles for the
    data-dependent loop, under balanced routing (every local expert gets n / local experts
    rows) and in the worst case (every row of the EP group to one device).
  * the FLOPs the routed rows need (2 x rows x (embed x 2 mlp + mlp x embed) x 3 for forward,
    d input and d weight), for the ratio.

Run it from another checkout (PYTHONPATH=<that tree>) to measure that tree's code: a tree
without `moe.ep_dispatch` runs only its one (dense) exchange.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from experiments.configs import ling_1t  # noqa: E402
from ling_jax.model.moe import grouped_matmul as gmm_module  # noqa: E402
from ling_jax.model.moe.layer import MoE  # noqa: E402
from ling_jax.parallel import use_sharding, variable_shardings  # noqa: E402
from ling_jax.parallel.hlo_stats import hlo_collectives, stablehlo_dots  # noqa: E402
from ling_jax.parallel.mesh import BATCH_AXES, make_mesh  # noqa: E402
from ling_jax.parallel.topology import tpu_devices  # noqa: E402

_TOPOLOGY = flags.DEFINE_string("topology", ling_1t.VERIFIED_TOPOLOGY, "TPU topology.")
_DISPATCH = flags.DEFINE_list("dispatch", ["dense", "ragged"], "moe.ep_dispatch values.")
_EXPERTS_PER_DEVICE = flags.DEFINE_integer(
    "experts_per_device", 0, "Routed experts per device (0: the preset's 256 / EP)."
)
_DUMP_DIR = flags.DEFINE_string(
    "dump_dir", "", "Also write <dispatch>.stablehlo.mlir and <dispatch>.hlo.txt here."
)

MiB = 2**20


def layer_config(dispatch: str, experts_per_device: int):
    config = ling_1t.get_config("aot")
    model = config.model
    ep = config.mesh.ici.expert * config.mesh.dcn.expert
    if experts_per_device:
        model.moe.num_experts = ep * experts_per_device
    if "ep_dispatch" in model.moe:
        model.moe.ep_dispatch = dispatch
    elif dispatch != "dense":
        raise app.UsageError(f"this tree has no moe.ep_dispatch; it cannot run {dispatch!r}")
    return config, ep


def compile_layer(config, devices):
    """(lowered StableHLO text, compiled HLO text, seconds) of one MoE layer's fwd + bwd."""
    mesh = make_mesh(config.mesh, devices)
    model = nnx.eval_shape(lambda: MoE(config.model, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def abstract(state):
        shardings = nnx.as_pure(variable_shardings(state, mesh))
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            nnx.as_pure(state),
            shardings,
        )

    def loss(params, rest, x, mask, cotangent):
        y, _ = nnx.merge(graphdef, params, rest)(x, mask)
        return jnp.vdot(y.astype(jnp.float32), cotangent)

    batch_axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    rows = NamedSharding(mesh, PartitionSpec(batch_axes))
    shape = (config.train.batch_size, config.data.seq_len)
    embed = config.model.hidden_size
    x = jax.ShapeDtypeStruct((*shape, embed), jnp.bfloat16, sharding=rows)
    mask = jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=rows)
    cotangent = jax.ShapeDtypeStruct((*shape, embed), jnp.float32, sharding=rows)
    step = jax.jit(jax.grad(loss, argnums=(0, 2)))
    start = time.perf_counter()
    with use_sharding(mesh):
        lowered = step.lower(abstract(params), abstract(rest), x, mask, cotangent)
    compiled = lowered.compile()
    return lowered.as_text(), compiled.as_text(), time.perf_counter() - start, mesh


def loop_trips(m: int, groups: int, tile: int, chunk: int, rows_per_group: int) -> dict:
    """Trip counts of the tile loop: static (all chunks), balanced and worst-case routing."""
    all_chunks = -(-(-(-m // tile) + groups) // chunk)
    if "used_chunks" not in getattr(gmm_module._TileLayout, "_fields", ()):
        return {"static": all_chunks}
    used_tiles = groups * -(-rows_per_group // tile)
    return {"balanced": -(-used_tiles // chunk), "worst": all_chunks}


def report(dispatch: str, experts_per_device: int) -> None:
    config, ep = layer_config(dispatch, experts_per_device)
    chip, devices = tpu_devices(_TOPOLOGY.value)
    lowered, hlo, seconds, mesh = compile_layer(config, devices)
    if _DUMP_DIR.value:
        os.makedirs(_DUMP_DIR.value, exist_ok=True)
        for suffix, text in (("stablehlo.mlir", lowered), ("hlo.txt", hlo)):
            with open(os.path.join(_DUMP_DIR.value, f"{dispatch}.{suffix}"), "w") as f:
                f.write(text)
    moe, embed = config.model.moe, config.model.hidden_size
    local = moe.num_experts // ep
    tokens = config.train.batch_size * config.data.seq_len // len(devices)
    n = tokens * moe.num_experts_per_tok  # rows each device sends (and, balanced, receives)
    row_bytes = embed * 2  # bf16
    print(f"\n== moe.ep_dispatch={dispatch}: {_TOPOLOGY.value}, mesh {dict(mesh.shape)}")
    print(
        f"   per chip: {tokens} tokens x top-{moe.num_experts_per_tok} = {n} routed rows, "
        f"{local} of {moe.num_experts} experts, embed {embed}, expert mlp "
        f"{moe.expert_intermediate_size}; compile {seconds:.0f} s"
    )
    print("   collectives (compiled HLO), data-operand bytes per chip:")
    routed_total = 0
    for c in hlo_collectives(hlo):
        note = ""
        if c.op == "ragged-all-to-all":
            note = f"  (routed rows sent, balanced: {n * row_bytes / MiB:9.1f} MiB)"
            routed_total += n * row_bytes
        elif c.op == "all-to-all" and c.operand_bytes >= row_bytes * n:
            routed_total += c.operand_bytes
        if c.operand_bytes >= MiB:
            print(f"     {c.op:<18}{c.operand_bytes / MiB:10.1f} MiB  {c.name}{note}")
    print(f"   token exchange bytes sent per chip per step: {routed_total / MiB:.1f} MiB")

    mlp = moe.expert_intermediate_size
    needed = 3 * 2 * n * (embed * 2 * mlp + mlp * embed)
    by_trips: dict[str, float] = {}
    for dot in stablehlo_dots(lowered):
        if dot.loop_depth == 0 or len(dot.lhs_shape) != 3:
            continue
        chunk, tile = dot.lhs_shape[:2]
        trips = loop_trips(ep * n, local, tile, chunk, n // local)
        for case, count in trips.items():
            by_trips[case] = by_trips.get(case, 0.0) + dot.flops * count
    print("   expert grouped-matmul FLOPs per chip (fwd + bwd):")
    print(f"     needed by the routed rows       {needed:.3e}")
    for case, flops in by_trips.items():
        print(f"     executed, {case + ' trips':<22}{flops:.3e}  ({flops / needed:.2f} x needed)")
    typical = by_trips.get("balanced", by_trips.get("static", 0.0))
    print(f"     typical at {chip.name} peak: {typical / chip.peak_flops * 1e3:.1f} ms")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for dispatch in _DISPATCH.value:
        report(dispatch, _EXPERTS_PER_DEVICE.value)


if __name__ == "__main__":
    app.run(main)
