"""From documents to fixed-length packed rows.

Each document is tokenized (plus EOS) and shifted once, before packing, into an example
  {"input_ids": [n] int32, "targets": [n] int32, "target_bytes": [n] int32}
with targets[i] = tokens[i + 1], so a target always belongs to the same document as its input,
even where packing splits a long document across rows. Grain's `ConcatThenSplitIterDataset`
then concatenates examples and cuts them into rows of `seq_len` (checkpointable: its state is
the parent's state plus the slice of the document in flight), and `FinalizeRow` renames and
masks its outputs into the layout the model consumes:

  input_ids    [seq_len] int32    tokens; pad_id on padding
  targets      [seq_len] int32    next token of the same document; pad_id on padding
  segment_ids  [seq_len] int32    1, 2, ... per document (or document chunk) in the row; 0 = pad
  positions    [seq_len] int32    0, 1, ... restarting at every segment
  loss_mask    [seq_len] float32  1 where the target is a real token, 0 on padding; examples
                                  that carry their own `loss_mask` (chat SFT: assistant tokens
                                  only) are packed with it, and it is kept under the padding mask
  target_bytes [seq_len] int32    UTF-8 bytes of each target token (0 for EOS and padding);
                                  bits/byte = sum(loss * loss_mask) / ln 2 / sum(target_bytes)

A document longer than the space left in a row is split; the chunk that continues in the next
row is a new segment whose positions restart at 0. Attention masked by segment ids therefore
never crosses a document, nor a chunk boundary.
"""

from __future__ import annotations

import grain
import numpy as np
from grain import experimental as grain_experimental

from ling_jax.data.tokenizer import Tokenizer

# Features of a tokenized example; all are packed alike.
EXAMPLE_FEATURES = ("input_ids", "targets", "target_bytes")
MASKED_EXAMPLE_FEATURES = (*EXAMPLE_FEATURES, "loss_mask")  # Chat examples (ling_jax.data.chat).
BATCH_FEATURES = ("input_ids", "targets", "segment_ids", "positions", "loss_mask", "target_bytes")


class TokenizeDocument(grain.transforms.Map):
    """str -> shifted example (see module docstring), or None for documents under 2 tokens."""

    def __init__(self, tokenizer: Tokenizer, *, add_eos: bool = True):
        self.tokenizer = tokenizer
        self.add_eos = add_eos

    def map(self, text: str) -> dict[str, np.ndarray] | None:
        ids = self.tokenizer.encode(text)
        if self.add_eos:
            ids = np.append(ids, np.int32(self.tokenizer.eos_id))
        if len(ids) < 2:
            return None  # Nothing to predict; dropped by `to_iter_dataset`.
        targets = ids[1:]
        return {
            "input_ids": ids[:-1],  # [n]
            "targets": targets,  # [n]
            "target_bytes": self.tokenizer.token_bytes[targets],  # [n]
        }


class FinalizeRow(grain.transforms.Map):
    """Renames ConcatThenSplit's outputs into the batch layout and masks the padding."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment_ids = row["input_ids_segment_ids"].astype(np.int32)  # [seq_len]
        real = segment_ids > 0
        loss_mask = real.astype(np.float32)
        if "loss_mask" in row:
            loss_mask = np.where(real, row["loss_mask"], 0.0).astype(np.float32)
        return {
            "input_ids": np.where(real, row["input_ids"], self.pad_id).astype(np.int32),
            "targets": np.where(real, row["targets"], self.pad_id).astype(np.int32),
            "segment_ids": segment_ids,
            "positions": row["input_ids_positions"].astype(np.int32),
            "loss_mask": loss_mask,
            "target_bytes": np.where(real, row["target_bytes"], 0).astype(np.int32),
        }


class _PackedRowsIterator(grain.DatasetIterator):
    """Finalizes ConcatThenSplit's rows; its state survives a JSON round trip.

    Grain checkpoints iterator states as JSON, which turns ConcatThenSplit's (-1, -1) "no
    remainder" slices into lists that it then mistakes for a remainder; restoring them as
    tuples fixes that.
    """

    def __init__(self, parent: grain.DatasetIterator, finalize: FinalizeRow):
        super().__init__(parent)
        self._finalize = finalize

    def __next__(self) -> dict[str, np.ndarray]:
        return self._finalize.map(next(self._parent))

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state(dict(state, remainder_slices=slices))


class PackedRowsIterDataset(grain.IterDataset):
    """Packs shifted examples into rows of `seq_len` tokens (layout in the module docstring)."""

    def __init__(
        self,
        examples: grain.IterDataset,
        *,
        seq_len: int,
        pad_id: int,
        features: tuple[str, ...] = EXAMPLE_FEATURES,
    ):
        super().__init__(
            grain_experimental.ConcatThenSplitIterDataset(
                examples,
                length_struct=dict.fromkeys(features, seq_len),
                split_full_length_features=True,
            )
        )
        self._finalize = FinalizeRow(pad_id)

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedRowsIterator(self._parent.__iter__(), self._finalize)


def pack_examples(
    examples: grain.IterDataset,
    *,
    seq_len: int,
    pad_id: int,
    features: tuple[str, ...] = EXAMPLE_FEATURES,
) -> grain.IterDataset:
    """Packs shifted examples into rows of `seq_len` tokens (see module docstring); `features`
    names the examples' [n] arrays (`MASKED_EXAMPLE_FEATURES` for chat examples)."""
    return PackedRowsIterDataset(examples, seq_len=seq_len, pad_id=pad_id, features=features)


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """An all-padding row (loss_mask 0), used to fill the last validation batch."""
    pad = np.full((seq_len,), pad_id, np.int32)
    zeros = np.zeros((seq_len,), np.int32)
    return {
        "input_ids": pad,
        "targets": pad.copy(),
        "segment_ids": zeros,
        "positions": zeros.copy(),
        "loss_mask": np.zeros((seq_len,), np.float32),
        "target_bytes": zeros.copy(),
    }


class PadBatch:
    """Stacks rows into a batch, filling a short final batch with all-padding rows."""

    def __init__(self, batch_size: int, seq_len: int, pad_id: int):
        self.batch_size = batch_size
        self.filler = empty_row(seq_len, pad_id)

    def __call__(self, rows):
        rows = list(rows) + [self.filler] * (self.batch_size - len(rows))
        return {k: np.stack([r[k] for r in rows]) for k in BATCH_FEATURES}  # [batch, seq_len]
