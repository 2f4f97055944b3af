"""FP8 dense matmuls (SPEC section 9) against BF16 on a GPU: speed, the GEMMs XLA emits, error.

Two figures per shape [m, k] x [k, n] (bf16 inputs, Ling-mini/flash projection and MLP shapes):

  product   the scaled FP8 product alone, y = (xq * xs) @ (wq * ws) with 1 x 128 / 128 x 1
            scales, from already-quantized operands: `triton` (the gmm kernel with one group,
            what `fp8_matmul(native=True)` runs on a GPU), `xla_batched` (E4M3 operands in one
            batched dot_general per 128-deep slice, the native path elsewhere) and `emulated`
            (dequantize, fp32 matmul); against `bf16` (x @ w in bf16, fp32 accumulation).
  train     forward + backward of `fp8_matmul` (quantizers included; wgrad in FP8) for the
            native and emulated modes, against the bf16 matmul's forward + backward.

It prints ms, TFLOP/s (2 m k n per product, 3 products for forward + backward), each FP8
product's relative error against the fp32 product of the same quantized operands, and which
FP8 GEMM XLA compiled the xla_batched product to (cuBLASLt's FP8 matmul, a Triton fusion, or an
upcast). On a CPU it runs the smallest shape only, as a smoke test.

    python -m benchmarks.fp8_matmul [--shapes=M,K,N;M,K,N]
"""

from __future__ import annotations

import argparse
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import median_seconds
from ling_jax.model.fp8.dense import batched_scaled_matmul, fp8_matmul, scaled_matmul
from pallas_kernels.fp8 import reference as fp8_ref
from pallas_kernels.gmm import scaled_matmul_gpu

GPU_SHAPES = (
    (8192, 2048, 3072),  # Ling-mini QKV projection: d_model 2048 -> (16 + 2 * 4) heads x 128.
    (8192, 2048, 5120),  # Ling-mini dense MLP up.
    (8192, 5120, 2048),  # ... and down.
    (8192, 4096, 4096),  # Ling-flash-sized square projection.
)
CPU_SHAPES = ((256, 384, 256),)


def quantized(x: jax.Array, w: jax.Array):
    xq, xs = fp8_ref.quantize_rowwise(x)  # [m, k], [m, kb]
    wq_t, ws_t = fp8_ref.quantize_rowwise(w.T)  # [n, k], [n, kb]: 128 x 1 column tiles
    return xq, xs, wq_t.T, ws_t.T


def gemms_in(compiled_text: str) -> str:
    """What XLA made of the dots: custom-call targets and fusion kinds that multiply."""
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled_text)))
    f8_dot = bool(re.search(r"f8e4m3fn\[[^\]]*\][^\n]*\b(dot|convolution)\(", compiled_text))
    triton = "__triton_gemm" in compiled_text or '"kind":"__triton' in compiled_text
    return f"custom_calls={targets or '-'} f8_dot_in_hlo={f8_dot} triton_fusion={triton}"


def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def bench_product(m: int, k: int, n: int, rng) -> None:
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.bfloat16)
    xq, xs, wq, ws = jax.jit(quantized)(x, w)
    exact = scaled_matmul(xq, xs, wq, ws, native=False)  # fp32 HIGHEST of the dequantized.
    interpret = jax.default_backend() != "gpu"
    scaled = (xq, xs, wq, ws)
    variants = {  # name: (function, its array arguments); arguments, not closed-over constants.
        "bf16": (bf16_matmul, (x, w)),
        "triton": (functools.partial(scaled_matmul_gpu, interpret=interpret), scaled),
        "xla_batched": (batched_scaled_matmul, scaled),
        "emulated": (functools.partial(scaled_matmul, native=False), scaled),
    }
    flops = 2 * m * k * n
    fields = []
    for name, (fn, args) in variants.items():
        jitted = jax.jit(fn)
        out = jitted(*args)
        seconds = median_seconds(functools.partial(jitted, *args), warmup=3, repeats=20)
        err = ""
        if name != "bf16":
            rel = jnp.linalg.norm(out.astype(jnp.float32) - exact) / jnp.linalg.norm(exact)
            err = f" rel_err={float(rel):.1e}"
        fields.append(f"{name}={seconds * 1e3:.3f}ms {flops / seconds / 1e12:.0f}TF/s{err}")
    text = jax.jit(batched_scaled_matmul).lower(xq, xs, wq, ws).compile().as_text()
    print(f"product m={m} k={k} n={n} | " + " | ".join(fields), flush=True)
    print(f"  xla_batched compiled to: {gemms_in(text)}", flush=True)


def bench_train(m: int, k: int, n: int, rng) -> None:
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.bfloat16)
    cot = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16)

    def step(matmul):
        def loss(a, b, c):
            return jnp.vdot(matmul(a, b).astype(jnp.float32), c.astype(jnp.float32))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    variants = {
        "bf16": step(
            lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)
        ),
        "fp8_native": step(functools.partial(fp8_matmul, native=True)),
        "fp8_emulated": step(functools.partial(fp8_matmul, native=False)),
    }
    flops = 3 * 2 * m * k * n
    fields = []
    for name, fn in variants.items():
        seconds = median_seconds(functools.partial(fn, x, w, cot), warmup=3, repeats=20)
        fields.append(f"{name}={seconds * 1e3:.3f}ms {flops / seconds / 1e12:.0f}TF/s")
    print(f"train m={m} k={k} n={n} fwd+bwd | " + " | ".join(fields), flush=True)


def parse_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    try:
        shapes = tuple(tuple(int(d) for d in s.split(",")) for s in text.split(";") if s)
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes={text!r}: expected M,K,N[;M,K,N...] of positive integers")
    return shapes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None, help="M,K,N;M,K,N (default: by backend)")
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    shapes = parse_shapes(args.shapes) if args.shapes else (GPU_SHAPES if on_gpu else CPU_SHAPES)
    print(f"device: {jax.devices()[0].device_kind}, median of 20", flush=True)
    rng = np.random.default_rng(0)
    for m, k, n in shapes:
        bench_product(m, k, n, rng)
        bench_train(m, k, n, rng)


if __name__ == "__main__":
    main()
