"""Batched generation: batch == alone, stop tokens, streaming, and no recompilation."""

from __future__ import annotations

import numpy as np
import pytest

from ling_jax.infer import Generator, SamplingConfig, bucket
from ling_jax.infer.generator import NO_TOKEN

PROMPTS = [[3, 17, 91], [5, 6, 7, 8, 9, 10, 11], [42]]
MAX_NEW = 8


@pytest.fixture(scope="module")
def generator(infer_model) -> Generator:
    return Generator(infer_model, pad_id=0, min_prompt_bucket=8, min_new_tokens_bucket=8)


@pytest.fixture(scope="module")
def greedy_batch(generator):
    return generator.generate(PROMPTS, MAX_NEW)


def test_bucket():
    assert [bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
    assert bucket(3, minimum=16) == 16


def test_batch_of_different_lengths_equals_each_prompt_alone(generator, greedy_batch):
    assert greedy_batch.finish_reasons == ["length"] * 3
    assert [len(t) for t in greedy_batch.tokens] == [MAX_NEW] * 3
    for prompt, tokens in zip(PROMPTS, greedy_batch.tokens, strict=True):
        assert generator.generate([prompt], MAX_NEW).tokens == [tokens]


def test_stop_tokens_end_a_row(generator, greedy_batch):
    stop = greedy_batch.tokens[0][2]
    out = generator.generate(PROMPTS, MAX_NEW, stop_tokens=[stop, 255])
    for row, expected in zip(out.tokens, greedy_batch.tokens, strict=True):
        cut = expected.index(stop) + 1 if stop in expected else len(expected)
        assert row == expected[:cut]
    assert out.finish_reasons[0] == "stop" and len(out.tokens[0]) <= 3
    # Streaming gives the same tokens, then nothing for the finished rows.
    steps = np.stack(list(generator.stream(PROMPTS, MAX_NEW, stop_tokens=[stop, 255])))
    for b, row in enumerate(out.tokens):
        assert steps[: len(row), b].tolist() == row
        assert (steps[len(row) :, b] == NO_TOKEN).all()


def test_sampling_is_seeded_and_streams_like_generate(generator):
    sampling = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)
    a = generator.generate(PROMPTS, MAX_NEW, sampling=sampling, seed=1)
    b = generator.generate(PROMPTS, MAX_NEW, sampling=sampling, seed=1)
    c = generator.generate(PROMPTS, MAX_NEW, sampling=sampling, seed=2)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    streamed = np.stack(list(generator.stream(PROMPTS, MAX_NEW, sampling=sampling, seed=1)))
    assert streamed.T.tolist() == a.tokens


def test_same_buckets_do_not_recompile(generator, greedy_batch):
    del greedy_batch  # Compiled the (batch 4, prompt 8, new 8) bucket.
    before = dict(generator.trace_counts)
    generator.generate(
        [[1, 2], [3, 4, 5, 6, 7, 8], [9, 10, 11, 12]],  # Other lengths, same buckets.
        MAX_NEW - 3,
        sampling=[SamplingConfig(0.7, 5, 0.8), SamplingConfig(), SamplingConfig(1.3, 0, 0.5)],
        stop_tokens=[1, 2, 3],
        seed=7,
    )
    assert dict(generator.trace_counts) == before


def test_rejects_bad_prompts(generator):
    with pytest.raises(ValueError, match="empty"):
        generator.generate([[1], []], 4)
    with pytest.raises(ValueError, match="vocab_size"):
        generator.generate([[1, 256]], 4)
