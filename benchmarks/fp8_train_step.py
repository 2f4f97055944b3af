"""Train-step time of a Ling-mini-shaped model in BF16 and in FP8 (SPEC section 9).

The model has Ling-mini-2.0's layer shapes (d_model 2048, 16 query / 4 KV heads of 128, MoE
layers of 64 experts of width 512 with top-8 routing in 8 groups and one shared expert) but few
layers and experts, so one device holds it. Each variant is the jitted loss and gradients of
one batch (`benchmarks.moe_vs_dense.make_step`), median of 5 after warm-up:

  bf16              BF16 GEMMs, routed experts on the Pallas grouped matmul
  fp8_native        FP8 GEMMs on the hardware's FP8 units (`fp8.mode=native`), experts through
                    `gmm_fp8` (wgrad "input": the weight gradient in BF16, as the kernel does)
  fp8_native_wgrad  the same with the FP8 weight gradient (`fp8.wgrad=fp8`): dense GEMMs
                    native, the experts emulated (dequantize, BF16 grouped matmul)
  fp8_emulated      every FP8 GEMM emulated (what a CPU or a pre-FP8 GPU runs)

Printed: ms per step, tokens/s, and each variant's loss on the same batch and weights (FP8
moves it by well under 1%).

    python -m benchmarks.fp8_train_step [--tokens=8192] [--seq_len=1024] [--layers=3]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import median_seconds
from benchmarks.moe_vs_dense import make_step
from ling_jax.configs import get_preset, validate_model_config
from ling_jax.model import LingForCausalLM, fp8

VARIANTS = {  # name: (fp8.enabled, fp8.mode, fp8.wgrad)
    "bf16": (False, "auto", "input"),
    "fp8_native": (True, "native", "input"),
    "fp8_native_wgrad": (True, "native", "fp8"),
    "fp8_emulated": (True, "emulated", "fp8"),
}


def model_config(num_layers: int, variant: str):
    """The Ling-mini-2.0 preset with `num_layers` layers, 64 experts and a 32k vocabulary."""
    cfg = get_preset("ling_mini_2")
    cfg.num_layers = num_layers
    cfg.vocab_size = 32768
    cfg.moe.num_experts = 64  # Top-8 in 8 groups (4 chosen) as in the preset.
    cfg.mtp.num_layers = 0
    cfg.dtype = "bfloat16"
    cfg.moe.backend = "pallas"
    cfg.fp8.enabled, cfg.fp8.mode, cfg.fp8.wgrad = VARIANTS[variant]
    cfg.fp8.monitor_every_steps = 0
    return validate_model_config(cfg)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=3, help="1 dense + (layers - 1) MoE")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown or args.tokens % args.seq_len or args.layers < 2:
        raise SystemExit(
            f"--variants from {sorted(VARIANTS)} (unknown: {sorted(unknown)}); --tokens a "
            "multiple of --seq_len; --layers >= 2"
        )
    ids = jax.random.randint(
        jax.random.key(0), (args.tokens // args.seq_len, args.seq_len), 0, 32768, jnp.int32
    )
    print(f"device: {jax.devices()[0].device_kind}, tokens/step={args.tokens}", flush=True)
    state = None
    for variant in args.variants.split(","):
        cfg = model_config(args.layers, variant)
        model = nnx.jit(lambda cfg=cfg: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))()
        if state is None:
            state = nnx.state(model)
        nnx.update(model, state)  # The same weights for every variant.
        step = make_step(model)
        loss = float(step(ids)[0])
        seconds = median_seconds(lambda step=step: step(ids), warmup=2, repeats=5)
        plan = fp8.plan(cfg) if cfg.fp8.enabled else "-"
        print(
            f"{variant}: {seconds * 1e3:.1f} ms/step {args.tokens / seconds:,.0f} tokens/s "
            f"loss={loss:.5f} plan={plan}",
            flush=True,
        )


if __name__ == "__main__":
    main()
