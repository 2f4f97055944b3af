"""TPU cost estimates of the grouped-matmul backends for Ling expert shapes, compiled from CPU.

For each Ling model (E = 256 experts, top-8, d_model, d_expert) and expert GEMM (gate/up:
[m, d] x [E, d, d_e]; down: [m, d_e] x [E, d_e, d]) with m = tokens_per_chip * 8 routed rows,
this AOT-compiles for a TPU topology (needs libtpu; no TPU) and prints, per implementation:
  * the TPU compiler's own cost analysis: flops, bytes accessed, and its time estimate
    (`optimal_seconds`; the compiler reports none for Pallas custom calls, printed "n/a"),
  * a roofline time max(flops / peak, bytes / HBM bandwidth) from those figures,
  * the ratio of that time to the dense baseline.
Implementations: the Pallas `gmm` (pallas_kernels.gmm), the "xla" and "ragged_dot" backends of
ling_jax.model.moe.grouped_matmul, and "dense", the batched matmul [E, m/E, k] x [E, k, n] of
the same FLOPs (perfectly balanced experts, no routing overhead).

Caveats, read before quoting numbers:
  * For a Pallas kernel XLA only sees the `CostEstimate` the kernel declares (useful flops
    2mkn, bytes of one pass). The "pallas/schedule" row instead counts what the kernel's visit
    schedule executes for a balanced random routing: MXU rows of every computed row sub-tile
    (straddling waste included) and every block DMA the grid issues (re-fetches included).
  * XLA's cost analysis leaves out the work inside while loops: the "xla" backend's chunked
    `lax.scan` reports ~0.1% of its FLOPs, and its time estimate follows the bytes outside the
    loop. Its row (marked "*") is not a cost estimate; use the CPU benchmark for that backend.
  * These are estimates, not measurements. Measure on hardware before tuning decisions.

    python -m benchmarks.kernels_tpu_estimate [--chip v5p] [--models mini,flash,1T]
        [--tokens 8192] [--modes fwd,fwd_bwd]

Peak figures (per chip, bf16 dense, from the Cloud TPU system architecture pages):
  v5e 197 TFLOP/s, 819 GB/s HBM; v5p 459 TFLOP/s, 2765 GB/s; v6e 918 TFLOP/s, 1640 GB/s.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Compile-only: no exclusive libtpu.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from ling_jax.model.moe.grouped_matmul import grouped_matmul  # noqa: E402
from pallas_kernels.gmm import default_tiling, gmm  # noqa: E402
from pallas_kernels.gmm import metadata as gmm_metadata  # noqa: E402
from pallas_kernels.gmm.tuning import Tiling, fit_tgmm  # noqa: E402

CHIPS = {  # topology name, peak bf16 FLOP/s, HBM bytes/s
    "v5e": ("v5e:2x2", 197e12, 819e9),
    "v5p": ("v5p:2x2x1", 459e12, 2765e9),
    "v6e": ("v6e:2x2", 918e12, 1640e9),
}
MODELS = {"mini": (2048, 512), "flash": (4096, 1024), "1T": (8192, 2048)}  # (d, d_expert)
NUM_EXPERTS, TOP_K = 256, 8
IMPLS = ("dense", "ragged_dot", "xla", "pallas")


def _cdiv(a, b):
    return -(-a // b)


def build(impl: str, mode: str, m: int, k: int, n: int, device_kind: str):
    """jit-able fn(lhs, rhs, group_sizes[, cot]) for one implementation and mode."""
    e = NUM_EXPERTS
    tiling = default_tiling(m, k, n, dtype=jnp.bfloat16, device_kind=device_kind)

    def forward(lhs, rhs, sizes):
        if impl == "dense":
            return jnp.einsum("gtk,gkn->gtn", lhs.reshape(e, -1, k), rhs).reshape(m, n)
        if impl == "pallas":
            return gmm(lhs, rhs, sizes, tiling=tiling)
        return grouped_matmul(lhs, rhs, sizes, backend=impl)

    if mode == "fwd":
        return forward

    def forward_and_backward(lhs, rhs, sizes, cot):
        # Returns the output too: a loss linear in it would let XLA drop the forward matmul.
        out, vjp = jax.vjp(lambda a, b: forward(a, b, sizes), lhs, rhs)
        return out, vjp(cot.astype(out.dtype))

    return forward_and_backward


def compiler_costs(fn, args) -> dict[str, float]:
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "flops": float(cost.get("flops", 0.0)),
        "bytes": float(cost.get("bytes accessed", 0.0)),
        "seconds": float(cost.get("optimal_seconds", -1.0)),
    }


# --- What the Pallas kernels' schedules execute (see pallas_kernels/gmm/tpu.py) -------------


def _visit_rows(sched, t: Tiling, m: int):
    """Per real visit: MXU rows computed (overlapping row sub-tiles x sub_m)."""
    offsets = np.asarray(sched.group_offsets)
    group, tile = np.asarray(sched.visit_group), np.asarray(sched.visit_tile)
    nv = int(np.asarray(sched.num_visits)[0])
    group, tile = group[:nv], tile[:nv]
    real = group >= 0
    g = np.maximum(group, 0)
    lo = np.clip(offsets[g] - tile * t.tm, 0, t.tm)
    hi = np.where(real, np.clip(offsets[g + 1] - tile * t.tm, 0, t.tm), lo)
    sub = t.sub_m or t.tm
    starts = np.arange(0, t.tm, sub)
    hit = (starts[None, :] < hi[:, None]) & (starts[None, :] + sub > lo[:, None])
    return (
        hit.sum(axis=1) * sub,
        real,
        np.asarray(sched.fetch_tile)[:nv],
        np.asarray(sched.fetch_group)[:nv],
    )


def _changes(x):
    return int(1 + np.count_nonzero(x[1:] != x[:-1])) if len(x) else 0


def gmm_schedule_cost(sizes, m, r, c, t: Tiling, in_b, out_b):
    """(flops, bytes) of one gmm kernel: reduction r (block t.tk), output c (block t.tn)."""
    num_r, num_c = _cdiv(r, t.tk), _cdiv(c, t.tn)
    sched = gmm_metadata.gmm_schedule(
        sizes, m=m, tm=t.tm, num_reduction_blocks=num_r, group_offset=0, num_local=len(sizes)
    )
    rows, real, ftile, fgroup = _visit_rows(sched, t, m)
    flops = 2.0 * rows.sum() * r * c
    if num_r == 1:  # Unchanged block indices between consecutive visits: no DMA.
        lhs_blocks, rhs_blocks = _changes(ftile), _changes(fgroup)
    else:
        lhs_blocks = rhs_blocks = int(real.sum()) * num_r
    lhs_bytes = num_c * lhs_blocks * t.tm * min(t.tk, r) * in_b
    rhs_bytes = num_c * rhs_blocks * min(t.tk, r) * min(t.tn, c) * in_b
    return flops, lhs_bytes + rhs_bytes + m * c * out_b


def tgmm_schedule_cost(sizes, m, k, n, t: Tiling, in_b, out_b):
    sched = gmm_metadata.tgmm_schedule(sizes, m=m, tm=t.tm, group_offset=0, num_local=len(sizes))
    rows, _, ftile, _ = _visit_rows(sched, t, m)
    num_k, num_n = _cdiv(k, t.tk), _cdiv(n, t.tn)
    flops = 2.0 * rows.sum() * k * n
    tiles = _changes(ftile)
    in_bytes = tiles * t.tm * (num_n * k + num_k * n) * in_b
    return flops, in_bytes + len(sizes) * k * n * out_b


def pallas_schedule_costs(mode, sizes, m, k, n, device_kind, in_b=2, out_b=2):
    t = default_tiling(m, k, n, dtype=jnp.bfloat16, device_kind=device_kind)
    flops, nbytes = gmm_schedule_cost(sizes, m, k, n, t, in_b, out_b)
    if mode == "fwd_bwd":
        swapped = Tiling(t.tm, t.tn, t.tk, t.sub_m)
        f2, b2 = gmm_schedule_cost(sizes, m, n, k, swapped, in_b, out_b)
        f3, b3 = tgmm_schedule_cost(
            sizes, m, k, n, fit_tgmm(t, k, n, in_b, out_b, device_kind), in_b, out_b
        )
        flops, nbytes = flops + f2 + f3, nbytes + b2 + b3
    return {"flops": flops, "bytes": float(nbytes), "seconds": -1.0}


# --- Report ---------------------------------------------------------------------------------


def roofline(cost, peak_flops, bandwidth):
    return max(cost["flops"] / peak_flops, cost["bytes"] / bandwidth)


def report(chip, model, op, mode, m, k, n, rows, peak, bw):
    print(
        f"\n{model} {op} {mode}: m={m} k={k} n={n} E={NUM_EXPERTS} bf16 on "
        f"{chip} ({peak / 1e12:.0f} TFLOP/s, {bw / 1e9:.0f} GB/s)"
    )
    print(
        f"  {'impl':<17}{'GFLOP':>9}{'GB':>8}{'compiler ms':>13}{'roofline ms':>13}"
        f"{'compiler/dense':>16}{'roofline/dense':>16}"
    )
    dense = rows["dense"]
    dense_roof = roofline(dense, peak, bw)
    for name, cost in rows.items():
        roof = roofline(cost, peak, bw)
        star = "*" if name == "xla" else " "
        has_time = cost["seconds"] > 0 and dense["seconds"] > 0
        compiler = f"{cost['seconds'] * 1e3:.3f}{star}" if cost["seconds"] > 0 else "n/a "
        ratio = f"{cost['seconds'] / dense['seconds']:.2f}" if has_time else "n/a"
        print(
            f"  {name:<17}{cost['flops'] / 1e9:>8.1f}{star}{cost['bytes'] / 1e9:>7.2f}{star}"
            f"{compiler:>14}{roof * 1e3:>12.3f}{ratio:>16}{roof / dense_roof:>16.2f}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", default="v5p", choices=sorted(CHIPS))
    parser.add_argument("--models", default="mini,flash,1T")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per chip")
    parser.add_argument("--modes", default="fwd,fwd_bwd")
    parser.add_argument("--impls", default=",".join(IMPLS))
    args = parser.parse_args(argv)

    from jax.experimental import topologies

    topology_name, peak, bw = CHIPS[args.chip]
    topology = topologies.get_topology_desc(topology_name=topology_name, platform="tpu")
    sharding = NamedSharding(Mesh(np.array(topology.devices[:1]), ("x",)), PartitionSpec())
    chip = topology.devices[0].device_kind
    m = args.tokens * TOP_K
    rng = np.random.default_rng(0)
    # Balanced routing: each routed row picks an expert uniformly (mean m / E rows per expert).
    sizes = np.bincount(rng.integers(0, NUM_EXPERTS, m), minlength=NUM_EXPERTS)
    sizes = jnp.asarray(sizes, jnp.int32)
    print(f"# AOT cost estimates for {chip}; tokens/chip={args.tokens}, top-{TOP_K}, m={m}")
    print("# compiler ms: XLA's optimal_seconds ('n/a': none reported, e.g. Pallas custom calls)")
    print("# roofline ms: max(flops / peak, bytes / bandwidth) of that row's flops and bytes")
    print("# * XLA leaves out work inside while loops: the scan-based 'xla' row is not meaningful")

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    for model in args.models.split(","):
        d, d_e = MODELS[model]
        for op, (k, n) in (("gate/up", (d, d_e)), ("down", (d_e, d))):
            for mode in args.modes.split(","):
                specs = [
                    sds((m, k), jnp.bfloat16),
                    sds((NUM_EXPERTS, k, n), jnp.bfloat16),
                    sds((NUM_EXPERTS,), jnp.int32),
                ]
                if mode == "fwd_bwd":
                    specs.append(sds((m, n), jnp.bfloat16))
                rows = {}
                for impl in args.impls.split(","):
                    start = time.perf_counter()
                    try:
                        fn = build(impl, mode, m, k, n, chip)
                        rows[impl] = compiler_costs(fn, specs)
                    except Exception as err:  # noqa: BLE001 - e.g. HBM OOM for 1T on v5e
                        print(f"  {impl}: compile failed: {str(err).splitlines()[0][:160]}")
                        continue
                    rows[impl]["compile_s"] = time.perf_counter() - start
                    if impl == "pallas":
                        rows["pallas/schedule"] = pallas_schedule_costs(mode, sizes, m, k, n, chip)
                if "dense" in rows:
                    report(chip, model, op, mode, m, k, n, rows, peak, bw)


if __name__ == "__main__":
    main()
