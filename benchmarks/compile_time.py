"""Compile time of the forward + backward step against depth: scanned layers keep it flat.

    python -m benchmarks.compile_time [--layers=4,32]

Compiles the gradient of the next-token loss for a small Ling-shaped model at each depth, with
scanned layers (the default) and, for comparison, unrolled ones, and prints the seconds.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ling_jax.configs import get_preset
from ling_jax.model import LingForCausalLM


def compile_seconds(num_layers: int, scan_layers: bool) -> float:
    cfg = get_preset("tiny")
    cfg.num_layers = num_layers
    cfg.scan_layers = scan_layers
    abstract = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

    def loss_fn(params, rest, ids):
        out = nnx.merge(graphdef, params, rest)(ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], ids[:, 1:])
        return ce.mean() + 0.1 * out.mtp_logits.mean()

    ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    start = time.perf_counter()  # tracing + lowering + XLA compilation
    jax.jit(jax.grad(loss_fn)).lower(params, rest, ids).compile()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,32")
    parser.add_argument("--no-unrolled", action="store_true", help="skip the unrolled runs")
    args = parser.parse_args(argv)
    for layers in (int(n) for n in args.layers.split(",")):
        scanned = compile_seconds(layers, scan_layers=True)
        line = f"layers={layers} scanned_compile_s={scanned:.2f}"
        if not args.no_unrolled:
            line += f" unrolled_compile_s={compile_seconds(layers, scan_layers=False):.2f}"
        print(line)


if __name__ == "__main__":
    main()
