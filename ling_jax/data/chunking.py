"""Documents -> tokenized examples, with bounded read-ahead memory however long a document is.

Grain reads and tokenizes `data.prefetch_buffer_size` documents ahead in threads. A document
of at most `data.document_chunk_chars` characters is tokenized there whole; a longer one leaves
only its index in the read-ahead buffer (`LongDocument`) and is tokenized later, one chunk of
at most `document_chunk_chars` characters at a time, by `ExpandLongDocuments`. So the buffer
holds at most `prefetch_buffer_size` chunks' worth of tokens, and a 60 MB document starts
training as soon as its first chunk is tokenized (rather than after the whole of it, held
once per buffer slot when the corpus is that one document repeated).

A chunk's last target is the first token of the next chunk (or EOS after the last one), so a
chunked document gives the same kind of shifted example as a whole one; each chunk is packed
as a segment of its own, like the pieces of any document longer than a row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from ling_jax.data.packing import TokenizeDocument
from ling_jax.data.sources import DocumentSource
from ling_jax.data.tokenizer import Tokenizer

# Characters of the next chunk tokenized to find its first token.
_LOOKAHEAD_CHARS = 64


@dataclasses.dataclass(frozen=True)
class LongDocument:
    """A document too long to tokenize in the read-ahead buffer: only its index is kept."""

    index: int


def chunk_starts(length: int, max_chars: int) -> range:
    """Start offsets of the chunks of a `length`-character text: [0, max_chars, ...]."""
    return range(0, max(length, 1), max_chars)


class ReadDocument(grain.transforms.Map):
    """Document index -> shifted example (short documents), `LongDocument`, or None (under 2
    tokens; dropped by `to_iter_dataset`)."""

    def __init__(
        self, source: DocumentSource, tokenizer: Tokenizer, *, add_eos: bool, max_chars: int
    ):
        self.source = source
        self.tokenize = TokenizeDocument(tokenizer, add_eos=add_eos)
        self.max_chars = max_chars

    def map(self, index: int):
        text = self.source[int(index)]
        if len(text) > self.max_chars:
            return LongDocument(int(index))
        return self.tokenize.map(text)


class _Chunks(Sequence):
    """The examples of one long document, tokenized on access (grain's flat map indexes it)."""

    def __init__(self, text: str, tokenizer: Tokenizer, *, add_eos: bool, max_chars: int):
        self._text, self._tokenizer = text, tokenizer
        self._add_eos, self._max_chars = add_eos, max_chars
        self._starts = chunk_starts(len(text), max_chars)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        start = self._starts[k]
        ids = np.asarray(self._tokenizer.encode(self._text[start : start + self._max_chars]))
        if not len(ids):
            ids = np.zeros((0,), np.int32)
            return dict.fromkeys(("input_ids", "targets", "target_bytes"), ids)
        if k + 1 < len(self._starts):
            end = start + self._max_chars
            following = self._tokenizer.encode(self._text[end : end + _LOOKAHEAD_CHARS])[:1]
        else:
            following = [self._tokenizer.eos_id] if self._add_eos else []
        inputs = ids if len(following) else ids[:-1]
        targets = np.concatenate([ids[1:], np.asarray(following, np.int32)]).astype(np.int32)
        return {
            "input_ids": np.asarray(inputs, np.int32),  # [n]
            "targets": targets,  # [n]
            "target_bytes": self._tokenizer.token_bytes[targets],  # [n]
        }


class ExpandLongDocuments(grain.experimental.FlatMapTransform):
    """Example -> [example]; `LongDocument` -> its chunks' examples, tokenized one at a time."""

    def __init__(
        self, source: DocumentSource, tokenizer: Tokenizer, *, add_eos: bool, max_chars: int
    ):
        self.source, self.tokenizer = source, tokenizer
        self.add_eos, self.max_chars = add_eos, max_chars
        # Grain bounds a flat map's fan-out; the chunk count has none.
        self.max_fan_out = 2**62

    def flat_map(self, element) -> Sequence[dict[str, np.ndarray]]:
        if not isinstance(element, LongDocument):
            return [element]
        text = self.source[element.index]
        return _Chunks(text, self.tokenizer, add_eos=self.add_eos, max_chars=self.max_chars)


def _nonempty(example: dict[str, np.ndarray]) -> bool:
    # A chunk the tokenizer maps to no token (e.g. whitespace a normalizer drops); packing an
    # empty example would break its segment numbering.
    return len(example["input_ids"]) > 0


def tokenized_examples(
    order: grain.MapDataset,
    source: DocumentSource,
    tokenizer: Tokenizer,
    *,
    add_eos: bool,
    max_chars: int,
    read_options: grain.ReadOptions,
) -> grain.IterDataset:
    """Shifted examples of the documents of `source` at the indices `order` yields."""
    examples = order.map(ReadDocument(source, tokenizer, add_eos=add_eos, max_chars=max_chars))
    expanded = grain.experimental.FlatMapIterDataset(
        examples.to_iter_dataset(read_options),
        ExpandLongDocuments(source, tokenizer, add_eos=add_eos, max_chars=max_chars),
    )
    return expanded.filter(_nonempty)


def text_pieces(text: str, max_chars: int) -> list[str]:
    """`text` cut into pieces of at most `max_chars` characters (e.g. to train the BPE)."""
    return [text[s : s + max_chars] for s in chunk_starts(len(text), max_chars)]


def check_usable(
    source: DocumentSource, tokenizer: Tokenizer, *, add_eos: bool, max_chars: int, what: str
) -> None:
    """Raises a ValueError naming `what` and its files unless some document of `source` gives
    a training example (2 tokens or more, EOS included).

    Reads documents in order and stops at the first usable one (the first, in any real
    corpus); without this check, a corpus of empty documents repeated forever would make the
    first batch wait forever.
    """
    for i in range(len(source)):
        text = source[i]
        if len(tokenizer.encode(text[:max_chars])) + int(add_eos) >= 2:
            return
    files = sorted({r.path for r in source.readers})
    shown = ", ".join(files[:5]) + (f", ... ({len(files)} files)" if len(files) > 5 else "")
    raise ValueError(
        f"{what}: no usable document: its {len(source)} document(s) are all empty or shorter "
        f"than 2 tokens (files: {shown or 'none'})"
    )
