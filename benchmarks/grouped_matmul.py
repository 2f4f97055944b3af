"""Forward + backward time of the grouped-matmul backends over a dense matmul of the same FLOPs.

For each shape, m = tokens * top_k rows are split over num_groups experts with skewed (random,
fixed-seed) group sizes. The baseline is the dense batched matmul
[num_groups, m / num_groups, k] x [num_groups, k, n], i.e. perfectly balanced groups with no
routing overhead. Each function is the jitted value-and-grad of sum(out * cotangent) w.r.t. both
operands, timed in the same run (median after warm-up).

    python -m benchmarks.grouped_matmul [--skip_ragged_dot]

Prints one line per shape with `xla_over_dense=<ratio>` and `ragged_dot_over_dense=<ratio>`.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import median_seconds
from ling_jax.model.moe.grouped_matmul import default_tile_rows, grouped_matmul

# (tokens, top_k, num_groups, k = d_model, n = d_expert): CPU-sized, ragged_dot still affordable.
SHAPES = (
    (2048, 8, 64, 256, 64),
    (2048, 4, 128, 256, 64),
)


def fwd_bwd(fn):
    """jit of (lhs, rhs, *extra, cotangent) -> sum(fn(lhs, rhs, *extra) * cotangent), grads."""

    def loss(lhs, rhs, *rest):
        *extra, cotangent = rest
        return jnp.vdot(fn(lhs, rhs, *extra), cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bench_shape(tokens, top_k, num_groups, k, n, *, ragged_dot: bool) -> dict[str, float]:
    m = tokens * top_k
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(num_groups, k, n)) / np.sqrt(k), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    load = rng.dirichlet(np.full(num_groups, 2.0))  # Skewed expert load, some groups tiny.
    sizes = np.bincount(rng.choice(num_groups, m, p=load), minlength=num_groups)
    group_sizes = jnp.asarray(sizes, jnp.int32)

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip_ragged_dot", action="store_true")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    main()
