"""Batched generation: prefill, then one token per row per step until a stop token or the limit.

    gen = Generator(model, pad_id=tokenizer.pad_id)
    out = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=64,
                       sampling=SamplingConfig(temperature=0.7, top_p=0.9), stop_tokens=[eos])
    out.tokens        # [[...], [...]]: each row's new tokens, its stop token included
    for step_tokens in gen.stream(prompts, 64): ...   # [batch] per step, -1 where a row is done

Prompts of different lengths are left-padded into one array (see `ling_jax.infer.cache`). The
shapes are bucketed to powers of two (batch, prompt length, new-token budget; stop-token lists
to multiples of 8), and the sampling settings, the budget within its bucket, the stop tokens
and the seed are traced values, so repeated calls in the same buckets reuse the compiled
programs. `generate` runs the whole decode loop on device (`lax.while_loop`, ending when every
row is done); `stream` runs one jitted step per token and hands each to the host.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ling_jax.infer.cache import KVCache, init_cache
from ling_jax.infer.forward import decode, prefill
from ling_jax.infer.sampling import SamplingConfig, SamplingParams, sample
from ling_jax.model.transformer import LingForCausalLM

NO_TOKEN = -1  # What `stream` reports for a row that emitted nothing this step.
GREEDY = SamplingConfig()


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


@struct.dataclass
class Request:
    """The traced inputs of one generation call (host-built, bucketed shapes)."""

    tokens: jax.Array  # [batch, prompt_len] int32, left-padded prompts
    start: jax.Array  # [batch] int32, padding slots before each prompt
    active: jax.Array  # [batch] bool, False for rows that only fill the batch bucket
    max_new_tokens: jax.Array  # [] int32
    sampling: SamplingParams
    stop_tokens: jax.Array  # [num_stop] int32, padded with -1
    key: jax.Array  # PRNG key


@struct.dataclass
class DecodeState:
    """The loop carry: the cache and the last emitted token of every row."""

    cache: KVCache
    token: jax.Array  # [batch] int32, emitted this step (the pad id where nothing was emitted)
    emitted: jax.Array  # [batch] bool, whether the row emitted `token` this step
    done: jax.Array  # [batch] bool, hit a stop token or the budget (or an inactive row)
    num_tokens: jax.Array  # [batch] int32, tokens emitted so far
    step: jax.Array  # [] int32, steps taken (prefill's token is step 1)


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # Per prompt: its new tokens, the stop token included if one came.
    finish_reasons: list[str]  # Per prompt: "stop" (a stop token) or "length" (the budget).


class Generator:
    """Jitted prefill and decode for one model; see the module docstring."""

    def __init__(
        self,
        model: LingForCausalLM,
        *,
        pad_id: int = 0,
        min_prompt_bucket: int = 16,
        min_new_tokens_bucket: int = 16,
    ):
        self.graphdef, self.state = nnx.split(model)
        self.config = model.config
        self.pad_id = pad_id
        self.min_prompt_bucket = min_prompt_bucket
        self.min_new_tokens_bucket = min_new_tokens_bucket
        # How often each program was traced (a retrace means a recompile); tests check it.
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._start_jit = jax.jit(self._start, static_argnames=("max_len",))
        self._step_jit = jax.jit(self._step, donate_argnums=(1,))
        self._generate_jit = jax.jit(self._generate, static_argnames=("max_len",))

    # ----- traced functions -----

    def _emit(self, ds: DecodeState, token: jax.Array, request: Request) -> DecodeState:
        emitted = ~ds.done
        token = jnp.where(emitted, token, self.pad_id)
        num_tokens = ds.num_tokens + emitted
        stopped = emitted & jnp.isin(token, request.stop_tokens)
        done = ds.done | stopped | (num_tokens >= request.max_new_tokens)
        return ds.replace(
            token=token, emitted=emitted, done=done, num_tokens=num_tokens, step=ds.step + 1
        )

    def _start(self, state, request: Request, *, max_len: int) -> DecodeState:
        self.trace_counts["start"] += 1
        model = nnx.merge(self.graphdef, state)
        cache = init_cache(self.config, request.start, max_len)
        logits, cache = prefill(model, request.tokens, cache)
        token = sample(logits, request.sampling, jax.random.fold_in(request.key, 0))
        batch = request.start.shape[0]
        ds = DecodeState(
            cache=cache,
            token=jnp.zeros((batch,), jnp.int32),
            emitted=jnp.zeros((batch,), bool),
            done=~request.active,
            num_tokens=jnp.zeros((batch,), jnp.int32),
            step=jnp.zeros((), jnp.int32),
        )
        return self._emit(ds, token, request)

    def _step(self, state, ds: DecodeState, request: Request) -> DecodeState:
        self.trace_counts["step"] += 1
        model = nnx.merge(self.graphdef, state)
        logits, cache = decode(model, ds.token[:, None], ds.cache)
        token = sample(logits[:, 0], request.sampling, jax.random.fold_in(request.key, ds.step))
        return self._emit(ds.replace(cache=cache), token, request)

    def _generate(self, state, request: Request, *, max_len: int):
        self.trace_counts["generate"] += 1
        budget = max_len - request.tokens.shape[1]  # The new-token bucket.
        ds = self._start(state, request, max_len=max_len)
        out = jnp.full((ds.token.shape[0], budget), self.pad_id, jnp.int32)
        out = out.at[:, 0].set(ds.token)

        def cond(carry):
            ds, _ = carry
            return ~jnp.all(ds.done) & (ds.step < budget)

        def body(carry):
            ds, out = carry
            ds = self._step(state, ds, request)
            return ds, out.at[:, ds.step - 1].set(ds.token)

        ds, out = jax.lax.while_loop(cond, body, (ds, out))
        return out, ds.num_tokens

    # ----- host side -----

    def _request(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingConfig | Sequence[SamplingConfig],
        stop_tokens: Sequence[int],
        seed: int,
    ) -> tuple[Request, int]:
        if not prompts:
            raise ValueError("generate: no prompts")
        vocab = self.config.vocab_size
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: expected at least one token")
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab})")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens}: expected >= 1")
        rows = len(prompts)
        batch = bucket(rows)
        prompt_len = bucket(max(len(p) for p in prompts), self.min_prompt_bucket)
        max_len = prompt_len + bucket(max_new_tokens, self.min_new_tokens_bucket)
        tokens = np.full((batch, prompt_len), self.pad_id, np.int32)
        start = np.full((batch,), prompt_len - 1, np.int32)  # Filler rows: one pad token.
        for i, prompt in enumerate(prompts):
            tokens[i, prompt_len - len(prompt) :] = prompt
            start[i] = prompt_len - len(prompt)
        if isinstance(sampling, SamplingConfig):
            sampling = [sampling] * rows
        if len(sampling) != rows:
            raise ValueError(f"{len(sampling)} sampling configs for {rows} prompts")
        sampling = list(sampling) + [SamplingConfig()] * (batch - rows)
        params = SamplingParams(
            temperature=np.array([s.temperature for s in sampling], np.float32),
            top_k=np.array([s.top_k for s in sampling], np.int32),
            top_p=np.array([s.top_p for s in sampling], np.float32),
        )
        stop = np.full((bucket(len(stop_tokens), 8),), -1, np.int32)
        stop[: len(stop_tokens)] = list(stop_tokens)
        request = Request(
            tokens=tokens,
            start=start,
            active=np.arange(batch) < rows,
            max_new_tokens=np.int32(max_new_tokens),
            sampling=params,
            stop_tokens=stop,
            key=jax.random.key(seed),
        )
        return request, max_len

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        sampling: SamplingConfig | Sequence[SamplingConfig] = GREEDY,
        stop_tokens: Sequence[int] = (),
        seed: int = 0,
    ) -> GenerationOutput:
        """Generates up to `max_new_tokens` for each prompt (token ids); one jitted call."""
        request, max_len = self._request(prompts, max_new_tokens, sampling, stop_tokens, seed)
        out, num_tokens = jax.device_get(self._generate_jit(self.state, request, max_len=max_len))
        stop = set(stop_tokens)
        tokens, reasons = [], []
        for i in range(len(prompts)):
            row = [int(t) for t in out[i, : num_tokens[i]]]
            tokens.append(row)
            reasons.append("stop" if row and row[-1] in stop else "length")
        return GenerationOutput(tokens=tokens, finish_reasons=reasons)

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        sampling: SamplingConfig | Sequence[SamplingConfig] = GREEDY,
        stop_tokens: Sequence[int] = (),
        seed: int = 0,
    ) -> Iterator[np.ndarray]:
        """Yields each step's tokens as they come: [len(prompts)] int32, NO_TOKEN where a row
        emitted nothing (it had finished). The first yield is the prefill's token. Same tokens
        as `generate` with the same arguments."""
        request, max_len = self._request(prompts, max_new_tokens, sampling, stop_tokens, seed)
        rows = len(prompts)
        ds = self._start_jit(self.state, request, max_len=max_len)
        while True:
            token, emitted, done = jax.device_get((ds.token, ds.emitted, ds.done))
            yield np.where(emitted, token, NO_TOKEN)[:rows]
            if done.all():
                return
            ds = self._step_jit(self.state, ds, request)
