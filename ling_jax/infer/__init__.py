"""Generation with a KV cache: prefill, incremental decode, sampling, chat format, loading.

    from ling_jax.infer import Generator, SamplingConfig
    gen = Generator(model, pad_id=0)
    out = gen.generate(prompts, max_new_tokens=128, sampling=SamplingConfig(temperature=0.7,
                       top_p=0.95), stop_tokens=[eos_id])

cache      KVCache (per-layer k/v after QK-norm and RoPE, left-padded rows), init_cache
forward    prefill / decode: the model's own modules run against the cache
sampling   greedy, temperature, top-k, top-p as traced per-row settings
generator  Generator: bucketed, jitted generate (on-device loop) and stream (token by token)
chat       Ling's chat format and its `detailed thinking on|off` modes
loading    load_checkpoint: a model from an experiments.run work directory
"""

from ling_jax.infer.cache import KVCache, init_cache
from ling_jax.infer.chat import apply_chat_template, ling_chat_prompt, render_chat_template
from ling_jax.infer.forward import decode, prefill
from ling_jax.infer.generator import GenerationOutput, Generator, bucket
from ling_jax.infer.loading import load_checkpoint
from ling_jax.infer.sampling import SamplingConfig, SamplingParams, filter_logits, sample

__all__ = [
    "GenerationOutput",
    "Generator",
    "KVCache",
    "SamplingConfig",
    "SamplingParams",
    "apply_chat_template",
    "bucket",
    "decode",
    "filter_logits",
    "init_cache",
    "ling_chat_prompt",
    "load_checkpoint",
    "prefill",
    "render_chat_template",
    "sample",
]
