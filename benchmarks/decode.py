"""Decode throughput of the quickstart model, and the memory of a 32K-token prefill / train step.

    python -m benchmarks.decode [--batches=1,16] [--prompt_len=32] [--new_tokens=96]
                                [--memory_seq_len=32768] [--skip_train_memory]

Decode: `Generator.generate` (the whole loop on device) with a random-init quickstart model,
greedy, no stop tokens, so every row emits exactly the requested tokens. Both runs share one
compiled program (same buckets); decode tokens/s = batch * (new_tokens - 1) / (t(new_tokens) -
t(1)), which takes the prefill out.

Memory: the compiled executables' `memory_analysis()` (temp = scratch beyond arguments and
outputs), for one sequence of `memory_seq_len` tokens, with `attention.impl` "xla" (a fp32
[heads, seq, seq] score matrix) against "chunked" (online softmax over 512-token tiles). Compiled
only, never run. The train step is forward + backward of the next-token loss (remat off).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.common import median_seconds
from experiments.configs.quickstart import quickstart_model
from ling_jax.configs import validate_model_config
from ling_jax.infer import Generator, init_cache, prefill
from ling_jax.model import LingForCausalLM


def model_config(attention_impl: str = "xla"):
    cfg = quickstart_model()
    cfg.mtp.num_layers = 0  # Generation does not run the MTP layer.
    cfg.attention.impl = attention_impl
    return validate_model_config(cfg)


def decode_tokens_per_second(generator: Generator, batch: int, prompt_len: int, new: int):
    rng = np.random.default_rng(0)
    vocab = generator.config.vocab_size
    prompts = [rng.integers(0, vocab, prompt_len).tolist() for _ in range(batch)]

    def run(max_new):
        return lambda: generator.generate(prompts, max_new).tokens

    t_full = median_seconds(run(new), warmup=1, repeats=3)
    t_first = median_seconds(run(1), warmup=1, repeats=3)
    return batch * (new - 1) / (t_full - t_first), t_first


def _bytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def prefill_memory(attention_impl: str, seq_len: int):
    cfg = model_config(attention_impl)
    abstract = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def run(state, tokens):
        model = nnx.merge(graphdef, state)
        cache = init_cache(cfg, jnp.zeros((1,), jnp.int32), seq_len)
        return prefill(model, tokens, cache)

    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.jit(run).lower(state, tokens).compile().memory_analysis()


def train_step_memory(attention_impl: str, seq_len: int):
    cfg = model_config(attention_impl)
    abstract = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

    def loss(params, rest, ids):
        logits = nnx.merge(graphdef, params, rest)(ids).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.jit(jax.grad(loss)).lower(params, rest, ids).compile().memory_analysis()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=96)
    parser.add_argument("--memory_seq_len", type=int, default=32768)
    parser.add_argument("--skip_train_memory", action="store_true")
    args = parser.parse_args(argv)

    model = nnx.jit(lambda: LingForCausalLM(model_config(), rngs=nnx.Rngs(0)))()
    # One new-token bucket for both lengths, so t(1) and t(new_tokens) share a program.
    generator = Generator(model, min_new_tokens_bucket=args.new_tokens)
    print(f"device: {jax.devices()[0].device_kind}; quickstart model, fp32, greedy")
    for batch in (int(b) for b in args.batches.split(",")):
        rate, first = decode_tokens_per_second(generator, batch, args.prompt_len, args.new_tokens)
        print(
            f"decode batch={batch:<3d} prompt={args.prompt_len} new={args.new_tokens}: "
            f"{rate:,.1f} tokens/s ({rate / batch:,.1f} per row); "
            f"prefill + first token {first * 1e3:.1f} ms"
        )

    seq = args.memory_seq_len
    kinds = [("prefill", prefill_memory)]
    if not args.skip_train_memory:
        kinds.append(("train step", train_step_memory))
    for name, measure in kinds:
        temps = {}
        for impl in ("xla", "chunked"):
            stats = measure(impl, seq)
            temps[impl] = stats.temp_size_in_bytes
            print(
                f"{name} seq={seq} attention={impl:<8s} temp {_bytes(stats.temp_size_in_bytes)}"
                f", arguments {_bytes(stats.argument_size_in_bytes)}"
                f", outputs {_bytes(stats.output_size_in_bytes)}"
            )
        print(
            f"{name.replace(' ', '_')}_temp_xla_over_chunked={temps['xla'] / temps['chunked']:.1f}"
        )


if __name__ == "__main__":
    main()
