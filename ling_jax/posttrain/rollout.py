"""Rollouts on the arithmetic set: prompts, sampled replies, verifiable rewards, the RL batch.

    prompts = arithmetic_prompts(tokenizer, indices, seed=...)      # chat-formatted, thinking off
    replies = sample_replies(generator, prompts, group_size=G, ...)  # G samples per prompt
    batch = rollout_batch(prompts, replies, pad_id=...)              # [P * G, seq] arrays

The batch is laid out like a training batch (`ling_jax.train.loss`): input_ids, targets,
positions, segment_ids (1 on the row's tokens, 0 on padding), plus completion_mask, 1 where
the target is a reply token (its stop token included), and reply_tokens, the reply's own tokens
under the same mask (LPO splits sentences on them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ling_jax.data.chat import arithmetic_qa
from ling_jax.data.tokenizer import Tokenizer
from ling_jax.infer.chat import ROLE_END, ling_chat_prompt
from ling_jax.infer.generator import Generator, bucket
from ling_jax.infer.sampling import SamplingConfig

PAUSE_PUNCTUATION = ",.;:!?\n，。；：！？、"  # Where LPO's sentences end (SPEC section 11).


@dataclasses.dataclass
class Prompts:
    tokens: list[np.ndarray]  # Per prompt: its chat-formatted token ids.
    answers: list[int]  # Per prompt: the verifiable answer.


@dataclasses.dataclass
class Replies:
    tokens: list[list[int]]  # [P * G] replies, prompt-major (prompt i's samples are i*G...).
    texts: list[str]  # The decoded replies, stop tokens removed.


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """EOS, and <|role_end|> where the tokenizer has it as one token (Ling's chat models)."""
    role_end = tokenizer.hf.token_to_id(ROLE_END)
    return [tokenizer.eos_id] + ([role_end] if role_end is not None else [])


def pause_token_ids(tokenizer: Tokenizer) -> np.ndarray:
    """Ids of the tokens whose text holds pause punctuation: [num_pause] int32 (LPO's sentence
    ends, the token-level reading of "split the detokenized text on pause punctuation")."""
    ids = [
        i
        for i in range(tokenizer.vocab_size)
        if any(ch in PAUSE_PUNCTUATION for ch in tokenizer.decode([i]))
    ]
    if not ids:
        raise ValueError("the tokenizer has no token with pause punctuation: LPO cannot split")
    return np.asarray(ids, np.int32)


def arithmetic_prompts(
    tokenizer: Tokenizer, indices: Sequence[int], *, seed: int, thinking: str = "off"
) -> Prompts:
    """Arithmetic problems `indices` of the set drawn with `seed`, as chat prompts."""
    tokens, answers = [], []
    for index in indices:
        question, _, answer = arithmetic_qa(np.random.default_rng([seed, int(index)]))
        text = ling_chat_prompt([{"role": "user", "content": question}], thinking=thinking)
        tokens.append(tokenizer.encode(text))
        answers.append(answer)
    return Prompts(tokens, answers)


def sample_replies(
    generator: Generator,
    tokenizer: Tokenizer,
    prompts: Prompts,
    *,
    group_size: int,
    max_new_tokens: int,
    sampling: SamplingConfig,
    seed: int,
) -> Replies:
    """`group_size` replies per prompt in one batched generation (prompt-major order)."""
    repeated = [p.tolist() for p in prompts.tokens for _ in range(group_size)]
    out = generator.generate(
        repeated,
        max_new_tokens,
        sampling=sampling,
        stop_tokens=stop_ids(tokenizer),
        seed=seed,
    )
    stops = set(stop_ids(tokenizer))
    texts = [tokenizer.decode([t for t in row if t not in stops]) for row in out.tokens]
    return Replies(out.tokens, texts)


def rollout_batch(
    prompts: Prompts, replies: Replies, *, group_size: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Prompt + reply rows, right-padded to a power-of-two length (see module docstring)."""
    rows = [
        np.concatenate([prompts.tokens[i // group_size], np.asarray(r, np.int32)])
        for i, r in enumerate(replies.tokens)
    ]
    seq = bucket(max(len(r) for r in rows) - 1, 16)
    batch = {
        k: np.zeros((len(rows), seq), np.int32)
        for k in ("input_ids", "targets", "positions", "segment_ids", "reply_tokens")
    }
    batch["input_ids"][:] = pad_id
    batch["targets"][:] = pad_id
    batch["completion_mask"] = np.zeros((len(rows), seq), np.float32)
    for i, row in enumerate(rows):
        n = len(row) - 1  # Input positions: every token but the last predicts the next one.
        prompt_len = len(prompts.tokens[i // group_size])
        batch["input_ids"][i, :n] = row[:-1]
        batch["targets"][i, :n] = row[1:]
        batch["positions"][i, :n] = np.arange(n)
        batch["segment_ids"][i, :n] = 1
        batch["completion_mask"][i, prompt_len - 1 : n] = 1.0  # Targets from the reply on.
        batch["reply_tokens"][i, prompt_len - 1 : n] = row[prompt_len:]
    return batch
