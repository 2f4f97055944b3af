"""Train-step time of a 1/32-sparse MoE model over a dense model with the same active shapes.

Both models share every shape except the FFN: the MoE layer has `num_experts` experts of width
`d_e`, `top_k` of them active plus one shared expert; the dense model's SwiGLU has width
(top_k + shared) * d_e, so both have the same active parameters and FLOPs per token. The step is
forward + backward (gradients of the next-token loss), jitted, measured in the same run.

    python -m benchmarks.moe_vs_dense [--backends=xla,ragged_dot] [--tokens=4096]

Prints one line per backend and, last, `moe_over_dense_step_time=<ratio>` for the first backend.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.common import median_seconds
from ling_jax.configs import base_model_config, validate_model_config
from ling_jax.model import LingForCausalLM, count_params


def benchmark_config(*, moe: bool, backend: str = "xla"):
    cfg = base_model_config()
    cfg.vocab_size = 1024
    cfg.hidden_size = 256
    cfg.num_layers = 4
    cfg.num_attention_heads = 4
    cfg.num_kv_heads = 2
    cfg.head_dim = 64
    cfg.dtype = "float32"
    cfg.mtp.num_layers = 0
    cfg.moe.num_experts = 64
    cfg.moe.num_experts_per_tok = 2  # 2 of 64 routed experts: 1/32, plus one shared
    cfg.moe.n_group = 8
    cfg.moe.topk_group = 4
    cfg.moe.expert_intermediate_size = 128
    cfg.moe.shared_expert_intermediate_size = 128
    cfg.moe.backend = backend
    active_width = (cfg.moe.num_experts_per_tok + 1) * cfg.moe.expert_intermediate_size
    cfg.intermediate_size = active_width
    cfg.first_k_dense_replace = 0 if moe else cfg.num_layers
    return validate_model_config(cfg)


def make_step(model: LingForCausalLM):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, ids):
        out = nnx.merge(graphdef, params, rest)(ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], ids[:, 1:])
        return ce.mean()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    return lambda ids: grad_fn(params, rest, ids)


def step_time(cfg, ids) -> float:
    model = nnx.jit(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))()
    step = make_step(model)
    return median_seconds(lambda: step(ids), warmup=2, repeats=5)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="xla,ragged_dot")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    parser.add_argument("--seq_len", type=int, default=256)
    args = parser.parse_args(argv)
    batch = args.tokens // args.seq_len
    ids = jax.random.randint(jax.random.key(0), (batch, args.seq_len), 0, 1024, jnp.int32)

    dense_cfg = benchmark_config(moe=False)
    moe_active = count_params(benchmark_config(moe=True), include_mtp=False)
    dense_active = count_params(dense_cfg, include_mtp=False)
    print(
        f"active params: moe={moe_active.active:,} (router {moe_active.by_module['router'][1]:,})"
        f" dense={dense_active.active:,}; tokens/step={batch * args.seq_len}"
    )
    dense = step_time(dense_cfg, ids)
    print(f"dense step: {dense * 1e3:.1f} ms")
    ratios = {}
    for backend in args.backends.split(","):
        moe = step_time(benchmark_config(moe=True, backend=backend), ids)
        ratios[backend] = moe / dense
        print(f"moe step [{backend}]: {moe * 1e3:.1f} ms  moe/dense={ratios[backend]:.3f}")
    first = args.backends.split(",")[0]
    print(f"moe_over_dense_step_time={ratios[first]:.3f}")


if __name__ == "__main__":
    main()
