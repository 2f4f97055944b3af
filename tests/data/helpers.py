"""Shared checks and builders for the data-pipeline tests."""

from __future__ import annotations

import json

import ml_collections
import numpy as np

from ling_jax import data
from ling_jax.data.packing import BATCH_FEATURES


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """The embedded default shrunk so a build takes well under a second once cached."""
    cfg = data.default_data_config()
    cfg.bpe_vocab_size = 300
    cfg.tokenizer_train_max_bytes = 150_000
    cfg.seq_len = 64
    cfg.embedded_arithmetic_docs = 500
    cfg.read_threads = 1
    cfg.prefetch_buffer_size = 4
    cfg.batch_prefetch = 0
    cfg.validation_max_batches = 3
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def check_rows(batch: dict[str, np.ndarray], *, seq_len: int, pad_id: int) -> None:
    """Asserts the packing invariants on a batch of rows: [batch, seq_len] each."""
    assert set(batch) == set(BATCH_FEATURES)
    for key in BATCH_FEATURES:
        assert batch[key].shape[-1] == seq_len, key
        assert batch[key].dtype == (np.float32 if key == "loss_mask" else np.int32), key
    for row in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][row]
        pos = batch["positions"][row]
        ids, tgt = batch["input_ids"][row], batch["targets"][row]
        real = seg > 0
        # Padding only at the end; segments numbered 1, 2, ... in order.
        num_real = int(real.sum())
        assert real[:num_real].all() and not real[num_real:].any()
        if num_real:
            assert seg[0] == 1
            assert set(np.diff(seg[:num_real])) <= {0, 1}
        # Positions restart at 0 at every segment start and count up inside it.
        starts = np.flatnonzero(real & (np.concatenate([[0], seg[:-1]]) != seg))
        assert (pos[starts] == 0).all()
        inside = real[1:] & (seg[1:] == seg[:-1])
        assert (pos[1:][inside] == pos[:-1][inside] + 1).all()
        assert (pos[~real] == 0).all()
        # Loss only on real tokens; the target of a token is the next input of its segment.
        np.testing.assert_array_equal(batch["loss_mask"][row], real.astype(np.float32))
        np.testing.assert_array_equal(tgt[:-1][inside], ids[1:][inside])
        assert (ids[~real] == pad_id).all() and (tgt[~real] == pad_id).all()
        assert (batch["target_bytes"][row][~real] == 0).all()


def json_roundtrip(state):
    """A state as a checkpoint stores it (grain writes iterator states as JSON)."""
    return json.loads(json.dumps(state))


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
