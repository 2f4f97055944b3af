"""Packing invariants: rows never mix documents, targets are next tokens, state restores."""

from __future__ import annotations

import grain
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_jax.data.packing import PadBatch, TokenizeDocument, pack_examples
from tests.data.helpers import assert_batches_equal, check_rows, json_roundtrip

PAD = 7


def _examples(lengths: list[int]) -> list[dict[str, np.ndarray]]:
    """Shifted examples of documents whose tokens encode (document, position): 1000 * d + p."""
    docs = [1000 * (d + 1) + np.arange(n + 1, dtype=np.int32) for d, n in enumerate(lengths)]
    return [
        {"input_ids": t[:-1], "targets": t[1:], "target_bytes": np.ones((len(t) - 1,), np.int32)}
        for t in docs
    ]


def _pack(lengths: list[int], seq_len: int) -> grain.IterDataset:
    examples = grain.MapDataset.source(_examples(lengths)).to_iter_dataset()
    return pack_examples(examples, seq_len=seq_len, pad_id=PAD)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    seq_len=st.integers(2, 16),
)
def test_packing_invariants(lengths, seq_len):
    rows = list(_pack(lengths, seq_len))
    for row in rows:
        check_rows({k: v[None] for k, v in row.items()}, seq_len=seq_len, pad_id=PAD)
        seg = row["segment_ids"]
        for s in set(seg[seg > 0].tolist()):
            ids, targets = row["input_ids"][seg == s], row["targets"][seg == s]
            # One segment = a contiguous piece of a single document.
            assert len(set((ids // 1000).tolist())) == 1
            np.testing.assert_array_equal(targets, ids + 1)
    # Nothing is lost or duplicated: the real tokens of all rows are the documents, in order.
    examples = _examples(lengths)
    for key in ("input_ids", "targets"):
        packed = np.concatenate([r[key][r["segment_ids"] > 0] for r in rows])
        np.testing.assert_array_equal(packed, np.concatenate([e[key] for e in examples]))
    # Concat-then-split pads only the last row.
    assert len(rows) == -(-sum(lengths) // seq_len)


def test_packing_state_restores_at_every_row():
    ds = _pack([5, 9, 3, 16, 8, 8, 20, 2, 7, 1], seq_len=8)
    rows = list(ds)
    for k in range(len(rows) + 1):
        it = iter(ds)
        for _ in range(k):
            next(it)
        restored = iter(ds)
        restored.set_state(json_roundtrip(it.get_state()))
        assert_batches_equal(list(restored), rows[k:])


def test_tokenize_document(small_tokenizer):
    tok = small_tokenizer
    example = TokenizeDocument(tok).map("x = 1\n")
    ids = tok.encode("x = 1\n")
    np.testing.assert_array_equal(example["input_ids"], ids)
    np.testing.assert_array_equal(example["targets"], np.append(ids[1:], tok.eos_id))
    assert example["target_bytes"].sum() == len("x = 1\n") - tok.num_bytes(ids[:1])
    assert TokenizeDocument(tok).map("") is None  # Only EOS: nothing to predict.
    assert TokenizeDocument(tok, add_eos=False).map("x") is None


def test_pad_batch_fills_with_masked_rows():
    rows = list(_pack([3, 4], seq_len=8))
    batch = PadBatch(4, 8, PAD)(rows)
    check_rows(batch, seq_len=8, pad_id=PAD)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["loss_mask"][1:].sum() == 0
