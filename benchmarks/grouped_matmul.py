"""Forward + backward time of the grouped-matmul backends over a dense matmul of the same FLOPs.

For each shape, m = tokens * top_k rows are split over num_groups experts with skewed (random,
fixed-seed) group sizes. The baseline is the dense batched matmul
[num_groups, m / num_groups, k] x [num_groups, k, n], i.e. perfectly balanced groups with no
routing overhead. Each function is the jitted value-and-grad of sum(out * cotangent) w.r.t. both
operands, timed in the same run (median after warm-up).

    python -m benchmarks.grouped_matmul [--skip_ragged_dot] [--gpu_only]
        [--gpu_tiling TM,TK,TN[,WARPS,STAGES]]

Prints one line per shape with `xla_over_dense=<ratio>` and `ragged_dot_over_dense=<ratio>`.

On a GPU it then times, at larger bf16 shapes (`GPU_SHAPES`), the Pallas Triton kernels
(`pallas_kernels.gmm` with target="gpu": forward gmm; backward gmm on the transposed weights and
tgmm), their FP8 recipe (`gmm_fp8`: E4M3 forward and d lhs, bf16 d rhs, quantizers included)
against `jax.lax.ragged_dot` and the dense batched matmul (cuBLAS), forward and forward +
backward, printing ms, TFLOP/s of useful work (2 m k n per product) and the ratio to dense,
plus the largest error of the bf16 kernel's output against ragged_dot's and the FP8 output's
relative error. Elsewhere that part is skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import median_seconds
from ling_jax.model.moe.grouped_matmul import default_tile_rows, grouped_matmul
from pallas_kernels.fp8 import gmm_fp8
from pallas_kernels.gmm import GpuTiling, gmm

# (tokens, top_k, num_groups, k = d_model, n = d_expert): CPU-sized, ragged_dot still affordable.
SHAPES = (
    (2048, 8, 64, 256, 64),
    (2048, 4, 128, 256, 64),
)


# GPU, bf16: (tokens, top_k, num_groups, k, n), Ling-mini/flash-like expert matmuls.
GPU_SHAPES = (
    (8192, 8, 64, 2048, 512),  # gate/up: [m, d] x [d, d_e]
    (8192, 8, 64, 512, 2048),  # down: [m, d_e] x [d_e, d]
    (4096, 8, 32, 4096, 1024),
)


def fwd_bwd(fn):
    """jit of (lhs, rhs, *extra, cotangent) -> sum(fn(lhs, rhs, *extra) * cotangent), grads."""

    def loss(lhs, rhs, *rest):
        *extra, cotangent = rest
        return jnp.vdot(fn(lhs, rhs, *extra), cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def skewed_group_sizes(rng, m: int, num_groups: int) -> jax.Array:
    load = rng.dirichlet(np.full(num_groups, 2.0))  # Skewed expert load, some groups tiny.
    sizes = np.bincount(rng.choice(num_groups, m, p=load), minlength=num_groups)
    return jnp.asarray(sizes, jnp.int32)


def bench_shape(tokens, top_k, num_groups, k, n, *, ragged_dot: bool) -> dict[str, float]:
    m = tokens * top_k
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(num_groups, k, n)) / np.sqrt(k), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    group_sizes = skewed_group_sizes(rng, m, num_groups)

    dense = fwd_bwd(lambda a, b: jnp.einsum("gtk,gkn->gtn", a, b))
    dense_args = (lhs.reshape(num_groups, -1, k), rhs, cotangent.reshape(num_groups, -1, n))
    times = {"dense": median_seconds(functools.partial(dense, *dense_args))}
    backends = ("xla", "ragged_dot") if ragged_dot else ("xla",)
    for backend in backends:
        step = fwd_bwd(lambda a, b, s, backend=backend: grouped_matmul(a, b, s, backend=backend))
        # ragged_dot costs ~num_groups dense matmuls on CPU: fewer repeats.
        reps = dict(warmup=1, repeats=3) if backend == "ragged_dot" else {}
        args = (lhs, rhs, group_sizes, cotangent)
        times[backend] = median_seconds(functools.partial(step, *args), **reps)
    return times


def bench_gpu_shape(tokens, top_k, num_groups, k, n, tiling: GpuTiling | None) -> dict:
    """{name: (forward seconds, fwd+bwd seconds)} for pallas_gpu, ragged_dot, dense; + error."""
    m = tokens * top_k
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(num_groups, k, n)) / np.sqrt(k), jnp.bfloat16)
    cotangent = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16)
    group_sizes = skewed_group_sizes(rng, m, num_groups)

    impls = {
        "pallas_gpu": (
            lambda a, b, s: gmm(a, b, s, tiling=tiling, target="gpu"),
            (lhs, rhs, group_sizes),
        ),
        "pallas_gpu_fp8": (
            lambda a, b, s: gmm_fp8(a, b, s, tiling=tiling, target="gpu"),
            (lhs, rhs, group_sizes),
        ),
        "ragged_dot": (jax.lax.ragged_dot, (lhs, rhs, group_sizes)),
        "dense": (
            lambda a, b: jnp.einsum("gtk,gkn->gtn", a, b),
            (lhs.reshape(num_groups, -1, k), rhs),
        ),
    }
    times, outputs, failures = {}, {}, {}
    for name, (fn, args) in impls.items():
        forward = jax.jit(fn)
        cot = cotangent if name != "dense" else cotangent.reshape(num_groups, -1, n)
        step = fwd_bwd(fn)
        outputs[name] = forward(*args)
        fwd_seconds = median_seconds(functools.partial(forward, *args))
        try:
            step_seconds = median_seconds(functools.partial(step, *args, cot))
        except jax.errors.JaxRuntimeError as e:  # e.g. ragged_dot's backward out of memory.
            step_seconds = float("nan")
            failures[name] = f"{name} fwd+bwd failed: {str(e).splitlines()[0][:120]}"
        times[name] = (fwd_seconds, step_seconds)
    want = outputs["ragged_dot"].astype(jnp.float32)
    error = jnp.max(jnp.abs(outputs["pallas_gpu"].astype(jnp.float32) - want))
    fp8_error = jnp.linalg.norm(outputs["pallas_gpu_fp8"].astype(jnp.float32) - want)
    return {
        "times": times,
        "failures": failures,
        "max_abs_err_vs_ragged_dot": float(error),
        "fp8_rel_err_vs_ragged_dot": float(fp8_error / jnp.linalg.norm(want)),
    }


def report_gpu(tiling: GpuTiling | None) -> None:
    if jax.default_backend() != "gpu":
        print(f"pallas_gpu: skipped (needs a GPU; jax.default_backend() = {jax.default_backend()})")
        return
    print(f"device: {jax.devices()[0].device_kind}, bf16, Pallas Triton gmm, median ms / TFLOP/s")
    for tokens, top_k, num_groups, k, n in GPU_SHAPES:
        m = tokens * top_k
        result = bench_gpu_shape(tokens, top_k, num_groups, k, n, tiling)
        times = result["times"]
        flops = 2 * m * k * n
        fields = []
        for name, (fwd, step) in times.items():
            fields.append(
                f"{name}: fwd={fwd * 1e3:.2f}ms {flops / fwd / 1e12:.0f}TF/s "
                f"fwd+bwd={step * 1e3:.2f}ms {3 * flops / step / 1e12:.0f}TF/s"
            )
        dense_fwd, dense_step = times["dense"]
        ratios = " ".join(
            f"{name}_over_dense=fwd {fwd / dense_fwd:.2f} fwd+bwd {step / dense_step:.2f}"
            for name, (fwd, step) in times.items()
            if name != "dense"
        )
        print(
            f"m={m} groups={num_groups} k={k} n={n} | " + " | ".join(fields) + f" | {ratios} | "
            f"max_abs_err_vs_ragged_dot={result['max_abs_err_vs_ragged_dot']:.3g} "
            f"fp8_rel_err_vs_ragged_dot={result['fp8_rel_err_vs_ragged_dot']:.2g}",
            flush=True,
        )
        for failure in result["failures"].values():
            print(f"  {failure}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip_ragged_dot", action="store_true")
    parser.add_argument(
        "--gpu_only", action="store_true", help="only the GPU table (skip the CPU-sized shapes)"
    )
    parser.add_argument(
        "--gpu_tiling",
        default=None,
        help="TM,TK,TN[,NUM_WARPS,NUM_STAGES] for the Pallas GPU kernels (default: the rule).",
    )
    args = parser.parse_args(argv)
    tiling = None
    if args.gpu_tiling:
        tiling = GpuTiling(*(int(x) for x in args.gpu_tiling.split(",")))
    if args.gpu_only:
        report_gpu(tiling)
        return
    print(f"device: {jax.devices()[0].device_kind}, fp32, fwd+bwd, median ms")
    for tokens, top_k, num_groups, k, n in SHAPES:
        m = tokens * top_k
        times = bench_shape(tokens, top_k, num_groups, k, n, ragged_dot=not args.skip_ragged_dot)
        line = (
            f"tokens={tokens} top_k={top_k} m={m} groups={num_groups} k={k} n={n} "
            f"tile={default_tile_rows(m, num_groups)} | "
            + " ".join(f"{name}={t * 1e3:.1f}ms" for name, t in times.items())
        )
        ratios = " ".join(
            f"{name}_over_dense={t / times['dense']:.2f}"
            for name, t in times.items()
            if name != "dense"
        )
        print(f"{line} | {ratios}", flush=True)
    report_gpu(tiling)


if __name__ == "__main__":
    main()
