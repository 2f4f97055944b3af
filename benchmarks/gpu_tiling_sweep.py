"""Sweeps the Triton kernels' blocks on a GPU: the data behind `tuning.default_gpu_tiling`.

For each problem it times every candidate `GpuTiling` (tm, tk, tn, num_warps, num_stages) and
the default rule's choice, forward only (median of 20 after warm-up), and prints TFLOP/s of
useful work (2 m k n) with the best candidate last:

  gmm_bf16   grouped bf16 matmul, m = tokens * top_k rows over skewed groups
  gmm_fp8    the same with E4M3 operands and 1 x 128 / 128 x 128 scales
  dense_fp8  `scaled_matmul_gpu` (one group), the dense FP8 product of `fp8_matmul`
  tgmm_bf16  the weight-gradient kernel, [groups, k, n] from lhs [m, k] and grad [m, n]
  *_kmajor   the same with the weights stored [.., n, k] (read with transpose_rhs): the
             K-major layout Hopper's wgmma wants for its B operand (required for FP8)

    python -m benchmarks.gpu_tiling_sweep [--problems=gmm_bf16,dense_fp8]

Needs a GPU (exits with the reason elsewhere).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import median_seconds
from benchmarks.grouped_matmul import skewed_group_sizes
from pallas_kernels.fp8 import reference as fp8_ref
from pallas_kernels.gmm import GpuTiling, default_gpu_tiling, gmm, scaled_matmul_gpu, tgmm

GROUPED = (65536, 64, 2048, 512)  # m, groups, k, n: Ling-mini-like gate/up, 8192 tokens x 8.
DENSE = (8192, 4096, 4096)  # m, k, n
CANDIDATES = {
    "gmm_bf16": [
        (128, 64, 128, 8, 3),
        (128, 64, 128, 4, 4),
        (128, 64, 256, 8, 3),
        (128, 128, 128, 8, 3),
        (64, 64, 128, 4, 4),
        (64, 64, 256, 4, 3),
        (256, 64, 128, 8, 3),
    ],
    "gmm_fp8": [
        (128, 128, 128, 8, 3),
        (128, 128, 128, 4, 4),
        (128, 128, 256, 8, 3),
        (64, 128, 128, 4, 4),
        (128, 64, 128, 8, 4),
        (256, 128, 128, 8, 3),
    ],
    "dense_fp8": [
        (128, 128, 128, 8, 3),
        (128, 128, 128, 4, 4),
        (128, 128, 256, 8, 3),
        (128, 128, 256, 8, 4),
        (256, 128, 128, 8, 3),
        (64, 128, 256, 4, 4),
        (128, 64, 256, 8, 4),
    ],
    "dense_fp8_kmajor": [(128, 128, 128, 8, 3), (128, 128, 128, 4, 4), (128, 128, 256, 8, 3)],
    "gmm_fp8_kmajor": [(128, 128, 128, 8, 3), (64, 128, 128, 4, 4), (128, 128, 256, 8, 3)],
    "gmm_bf16_kmajor": [(128, 64, 128, 8, 3), (128, 64, 256, 8, 3)],
    "tgmm_bf16": [
        (64, 128, 128, 8, 3),
        (64, 128, 128, 4, 4),
        (32, 128, 128, 4, 4),
        (64, 128, 256, 8, 3),
        (128, 128, 128, 8, 3),
        (64, 256, 128, 8, 3),
    ],
}


def problem(name: str, rng):
    """(function of a tiling, its arguments, FLOPs, default tiling) for one sweep."""
    if name == "dense_fp8_kmajor":  # The weight stored [n, k] (K-major), one group.
        m, k, n = DENSE
        xq, xs = fp8_ref.quantize_rowwise(jnp.asarray(rng.normal(size=(m, k)), jnp.float32))
        wq, ws = fp8_ref.quantize_blockwise(jnp.asarray(rng.normal(size=(1, n, k)), jnp.float32))
        one_group = jnp.asarray([m], jnp.int32)

        def fn(t, xq, xs, wq, ws):
            return gmm(xq, wq, one_group, lhs_scale=xs, rhs_scale=ws, tiling=t, transpose_rhs=True)

        return fn, (xq, xs, wq, ws), 2 * m * k * n, default_gpu_tiling(m, k, n, dtype=xq.dtype)
    if name == "dense_fp8":
        m, k, n = DENSE
        xq, xs = fp8_ref.quantize_rowwise(jnp.asarray(rng.normal(size=(m, k)), jnp.float32))
        wq, ws = fp8_ref.quantize_rowwise(jnp.asarray(rng.normal(size=(n, k)), jnp.float32))
        args = (xq, xs, wq.T, ws.T)

        def fn(t, *a):
            return scaled_matmul_gpu(*a, tiling=t)

        return fn, args, 2 * m * k * n, default_gpu_tiling(m, k, n, dtype=xq.dtype)
    m, groups, k, n = GROUPED
    sizes = skewed_group_sizes(rng, m, groups)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(groups, k, n)) / np.sqrt(k), jnp.bfloat16)
    flops = 2 * m * k * n
    if name == "gmm_bf16":
        return (
            lambda t, *a: gmm(*a, tiling=t),
            (lhs, rhs, sizes),
            flops,
            default_gpu_tiling(m, k, n, dtype=lhs.dtype, num_groups=groups),
        )
    if name == "tgmm_bf16":
        grad = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16)
        return (
            lambda t, *a: tgmm(*a, tiling=t, preferred_element_type=jnp.bfloat16),
            (lhs, grad, sizes),
            flops,
            default_gpu_tiling(m, k, n, dtype=lhs.dtype, tgmm=True),
        )
    if name == "gmm_fp8":
        lq, ls = fp8_ref.quantize_rowwise(lhs)
        wq, ws = fp8_ref.quantize_blockwise(rhs)

        def fn(t, lq, ls, wq, ws, s):
            return gmm(lq, wq, s, lhs_scale=ls, rhs_scale=ws, tiling=t)

        default = default_gpu_tiling(m, k, n, dtype=lq.dtype, num_groups=groups)
        return fn, (lq, ls, wq, ws, sizes), flops, default
    if name == "gmm_fp8_kmajor":  # Weights stored [groups, n, k]: K-major, as wgmma wants B.
        lq, ls = fp8_ref.quantize_rowwise(lhs)
        wq, ws = fp8_ref.quantize_blockwise(jnp.swapaxes(rhs, 1, 2))

        def fn(t, lq, ls, wq, ws, s):
            return gmm(lq, wq, s, lhs_scale=ls, rhs_scale=ws, tiling=t, transpose_rhs=True)

        default = default_gpu_tiling(m, k, n, dtype=lq.dtype, num_groups=groups)
        return fn, (lq, ls, wq, ws, sizes), flops, default
    if name == "gmm_bf16_kmajor":
        return (
            lambda t, *a: gmm(*a, tiling=t, transpose_rhs=True),
            (lhs, jnp.swapaxes(rhs, 1, 2), sizes),
            flops,
            default_gpu_tiling(m, k, n, dtype=lhs.dtype, num_groups=groups),
        )
    raise SystemExit(f"unknown problem {name!r}; choose from {sorted(CANDIDATES)}")


def sweep(name: str, rng) -> None:
    fn, args, flops, default = problem(name, rng)
    tilings = [GpuTiling(*c) for c in CANDIDATES[name]]
    if default not in tilings:
        tilings.insert(0, default)
    results = []
    for t in tilings:
        jitted = jax.jit(functools.partial(fn, t))
        try:
            seconds = median_seconds(functools.partial(jitted, *args), warmup=3, repeats=20)
        except Exception as e:  # A block the compiler rejects (shared memory): report, go on.
            print(f"{name} {tuple(t)}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        tag = " (default)" if t == default else ""
        print(f"{name} {tuple(t)}: {seconds * 1e3:.3f}ms {flops / seconds / 1e12:.0f}TF/s{tag}")
        results.append((seconds, t))
    best_seconds, best = min(results)
    print(f"{name} best {tuple(best)}: {flops / best_seconds / 1e12:.0f}TF/s", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default=",".join(CANDIDATES))
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit(f"needs a GPU (jax.default_backend() = {jax.default_backend()})")
    print(f"device: {jax.devices()[0].device_kind}", flush=True)
    rng = np.random.default_rng(0)
    for name in args.problems.split(","):
        sweep(name, rng)


if __name__ == "__main__":
    main()
