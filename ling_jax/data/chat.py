"""Chat-formatted SFT data (DFT, SPEC section 11): Ling's template, loss on assistant tokens.

A chat document is the JSON of one conversation: a list of messages, or an object
{"messages": [...], "thinking": "on" | "off"}; `data.chat_thinking` picks the mode where the
document does not ("on", "off", or "mixed": by a hash of the text, so about half of each). The
conversation is rendered with `ling_chat_prompt` piece by piece: everything up to and including
each assistant turn's `<role>ASSISTANT</role>` header is context, the turn itself (its
`<|role_end|>` included) is trained, and EOS follows the last turn so generation learns to stop.
Pieces are tokenized separately, as a prompt and its generated reply are at inference time.

The example carries `loss_mask` [n] float32, 1 where the target is an assistant token, packed
beside the other features (`ling_jax.data.packing`) so it stays aligned with the segment ids.

Sources: `arithmetic_chat_source` turns the embedded arithmetic set into conversations;
`chat_jsonl_source` reads JSONL files with one conversation (the whole object) per line.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from ling_jax.data.config import MixtureComponent, parse_mixture
from ling_jax.data.embedded import arithmetic_problem
from ling_jax.data.packing import EXAMPLE_FEATURES, MASKED_EXAMPLE_FEATURES
from ling_jax.data.sources import DocumentSource, JsonlReader, expand_globs
from ling_jax.data.tokenizer import Tokenizer
from ling_jax.infer.chat import THINKING_MODES, ling_chat_prompt

CHAT_THINKING = ("on", "off", "mixed")


def arithmetic_qa(rng: np.random.Generator) -> tuple[str, str, int]:
    """One arithmetic problem as (question, worked steps, answer), e.g.
    ("37 + 45 * 2 = ?", "45 * 2 = 90; 37 + 90 = 127.", 127)."""
    text = arithmetic_problem(rng)  # "Q: <question> A: <steps>."
    question, steps = text[len("Q: ") :].split(" A: ")
    return question, steps, int(steps.rstrip(".").split("= ")[-1])


def arithmetic_conversation(index: int, *, seed: int = 0) -> dict:
    """Conversation `index` (deterministic): a question and its solution; even indices think
    ("on": the steps inside <think>, then the answer), odd ones answer directly ("off": the steps
    and the answer)."""
    question, steps, answer = arithmetic_qa(np.random.default_rng([seed, index]))
    thinking = "on" if index % 2 == 0 else "off"
    if thinking == "on":
        reply = f"<think>\n{steps}\n</think>\n\nThe answer is {answer}."
    else:
        reply = f"{steps} The answer is {answer}."
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply},
        ],
        "thinking": thinking,
        "answer": answer,
    }


class ArithmeticChatReader:
    """`num_records` arithmetic conversations as JSON documents (a `FileReader`)."""

    path = "<arithmetic_chat>"

    def __init__(self, num_records: int, *, seed: int = 0):
        self.num_records = num_records
        self.seed = seed

    def read(self, index: int) -> str:
        return json.dumps(arithmetic_conversation(index, seed=self.seed))


def arithmetic_chat_source(num_docs: int, *, seed: int = 0) -> DocumentSource:
    """The embedded arithmetic set as conversations, keyed by index (each its own group)."""
    return DocumentSource([ArithmeticChatReader(num_docs, seed=seed)], names=["arithmetic_chat"])


class ChatJsonlReader(JsonlReader):
    """A JSONL file whose every line is one conversation; the document is the line's JSON."""

    def read(self, index: int) -> str:
        return self._read_line(index).decode("utf-8")  # JsonlReader's line access (pread/seek).


def chat_jsonl_source(spec: str, *, field: str) -> DocumentSource:
    """Conversations of the JSONL files matched by `spec` (comma-separated globs)."""
    readers = [ChatJsonlReader(p, text_key="messages") for p in expand_globs(spec, field)]
    names = [os.path.basename(r.path) for r in readers]
    return DocumentSource(readers, names=names, groups=names)


def parse_conversation(document: str, default_thinking: str) -> tuple[list[dict], str]:
    """(messages, thinking mode) of a chat document; raises ValueError naming the problem."""
    try:
        obj = json.loads(document)
    except json.JSONDecodeError as e:
        raise ValueError(f"chat document is not JSON ({e}): {document[:80]!r}") from e
    thinking = default_thinking
    if isinstance(obj, dict):
        thinking = obj.get("thinking", default_thinking)
        obj = obj.get("messages")
    if not isinstance(obj, list) or not all(isinstance(m, dict) and "role" in m for m in obj):
        raise ValueError(
            f"chat document {document[:80]!r}: expected a list of {{'role', 'content'}} messages "
            "or an object with 'messages'"
        )
    if not any(m["role"] == "assistant" for m in obj):
        raise ValueError(f"chat document {document[:80]!r} has no assistant turn to train on")
    if thinking == "mixed":
        thinking = THINKING_MODES[zlib.crc32(document.encode()) % 2]
    if thinking not in THINKING_MODES:
        raise ValueError(f"chat document thinking = {thinking!r}: expected one of {THINKING_MODES}")
    return obj, thinking


def chat_pieces(messages: Sequence[dict], thinking: str) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, is_assistant) pieces.

    Each assistant turn whose rendering is a prefix of the whole conversation's is trained;
    an earlier turn that the template re-renders (thinking dropped from history) is context.
    """
    full = ling_chat_prompt(messages, thinking=thinking, add_generation_prompt=False)
    pieces, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = ling_chat_prompt(messages[:i], thinking=thinking, add_generation_prompt=True)
        upto = ling_chat_prompt(messages[: i + 1], thinking=thinking, add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(prompt)) or len(prompt) < done:
            continue
        pieces += [(full[done : len(prompt)], False), (full[len(prompt) : len(upto)], True)]
        done = len(upto)
    if done < len(full):
        pieces.append((full[done:], False))
    return [(text, trained) for text, trained in pieces if text]


class TokenizeChat(grain.transforms.Map):
    """Chat document -> shifted example with `loss_mask` (see module docstring)."""

    def __init__(self, tokenizer: Tokenizer, *, thinking: str = "mixed"):
        if thinking not in CHAT_THINKING:
            raise ValueError(f"data.chat_thinking = {thinking!r}: expected one of {CHAT_THINKING}")
        self.tokenizer = tokenizer
        self.thinking = thinking

    def map(self, document: str) -> dict[str, np.ndarray]:
        messages, thinking = parse_conversation(document, self.thinking)
        ids, trained = [], []
        pieces = chat_pieces(messages, thinking)
        for text, is_assistant in pieces:
            piece = self.tokenizer.encode(text)
            ids.append(piece)
            trained.append(np.full(piece.shape, is_assistant))
        ids.append(np.array([self.tokenizer.eos_id], np.int32))
        # EOS after a final assistant turn is trained: it ends the reply.
        trained.append(np.array([pieces[-1][1]]))
        ids, trained = np.concatenate(ids), np.concatenate(trained)
        targets = ids[1:]
        return {
            "input_ids": ids[:-1],  # [n]
            "targets": targets,  # [n]
            "target_bytes": self.tokenizer.token_bytes[targets],  # [n]
            "loss_mask": trained[1:].astype(np.float32),  # [n] 1 where the target is trained
        }


def chat_sources(cfg: ml_collections.ConfigDict) -> list[tuple[str, float, DocumentSource]]:
    """(name, weight, source) of the chat training components named by the `data` config."""
    if cfg.source == "embedded":
        return [("arithmetic_chat", 1.0, arithmetic_chat_source(cfg.embedded_arithmetic_docs))]
    field = "mixture" if cfg.mixture else "train_files"
    specs = parse_mixture(cfg.mixture) if cfg.mixture else [MixtureComponent(cfg.train_files, 1)]
    return [(s.files, s.weight, chat_jsonl_source(s.files, field=field)) for s in specs]


class ReadChat(grain.transforms.Map):
    """Document index -> `TokenizeChat` example of that conversation of `source`."""

    def __init__(self, source: DocumentSource, tokenizer: Tokenizer, *, thinking: str):
        self.source = source
        self.tokenize = TokenizeChat(tokenizer, thinking=thinking)

    def map(self, index: int) -> dict[str, np.ndarray]:
        return self.tokenize.map(self.source[int(index)])


def chat_examples(
    order: grain.MapDataset,
    source: DocumentSource,
    tokenizer: Tokenizer,
    *,
    thinking: str,
    read_options: grain.ReadOptions,
) -> grain.IterDataset:
    """Shifted chat examples (with `loss_mask`) of the conversations at the indices `order`
    yields; the counterpart of `ling_jax.data.chunking.tokenized_examples`."""
    return order.map(ReadChat(source, tokenizer, thinking=thinking)).to_iter_dataset(read_options)


def example_features(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The [n] arrays of an example, as `pack_examples` packs them."""
    return MASKED_EXAMPLE_FEATURES if cfg.chat else EXAMPLE_FEATURES
