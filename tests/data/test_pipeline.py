"""`build_datasets` end to end: layout, determinism, sharding, mixtures, resume, validation."""

from __future__ import annotations

import json
import os
import re

import ml_collections
import numpy as np
import pytest

from ling_jax import data
from ling_jax.data import pipeline
from tests.data.helpers import assert_batches_equal, check_rows, json_roundtrip, tiny_config

# Rows of the generated arithmetic set hold nothing else (stdlib rows always do).
ARITHMETIC = re.compile(r"[0-9+\-*=?;.:QA \n]*")
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def _take(ds, n: int) -> list[dict]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _write_docs(folder, prefix: str, count: int, files: int = 2) -> None:
    """`count` short JSONL documents tagged "<prefix>-<index>", spread over `files` files."""
    folder.mkdir(exist_ok=True)
    for f in range(files):
        with open(folder / f"{prefix}-{f}.jsonl", "w") as out:
            for i in range(f, count, files):
                words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3))
                out.write(json.dumps({"text": f"{prefix}-{i:03d} {words}."}) + "\n")


def _files_config(glob: str, **overrides):
    cfg = tiny_config(source="files", train_files=glob, validation_max_batches=0)
    cfg.bpe_vocab_size = 280
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _tags(ds, tokenizer, prefix: str) -> list[str]:
    """Document tags in the real tokens of a finite dataset, read in order.

    Rows are decoded as one stream because packing may split a document (and its tag) across
    consecutive rows.
    """
    tokens = [
        batch["input_ids"][row][batch["segment_ids"][row] > 0]
        for batch in ds
        for row in range(batch["input_ids"].shape[0])
    ]
    return re.findall(rf"{prefix}-\d+", tokenizer.decode(np.concatenate(tokens)))


def test_embedded_batches(embedded_workdir):
    cfg = tiny_config()
    train, validation, tokenizer = data.build_datasets(cfg, workdir=embedded_workdir, batch_size=4)
    data.check_vocab(tokenizer, 300)
    batches = _take(train, 3)
    texts = []
    for batch in batches:
        assert batch["input_ids"].shape == (4, cfg.seq_len)
        check_rows(batch, seq_len=cfg.seq_len, pad_id=tokenizer.pad_id)
        assert batch["loss_mask"].sum() == 4 * cfg.seq_len  # Training rows are full.
        texts += [tokenizer.decode(row) for row in batch["input_ids"]]
    # Rows come from both components: generated arithmetic and stdlib source.
    assert any("Q: " in t for t in texts) and any("Q: " not in t for t in texts)
    # Bytes per target token add up to the decoded text of the targets.
    row = batches[0]["targets"][0]
    assert batches[0]["target_bytes"][0].sum() == len(tokenizer.decode(row).encode()) - sum(
        len(tokenizer.decode([t]).encode()) for t in row if t == tokenizer.eos_id
    )


def test_build_reuses_cached_tokenizer(embedded_workdir):
    cache = os.path.join(embedded_workdir, "tokenizer", "tokenizer.json")
    mtime = os.stat(cache).st_mtime_ns
    data.build_datasets(tiny_config(), workdir=embedded_workdir, batch_size=2)
    assert os.stat(cache).st_mtime_ns == mtime


def test_same_seed_same_batches(embedded_workdir):
    def first(seed):
        ds = data.build_datasets(tiny_config(), workdir=embedded_workdir, batch_size=2, seed=seed)
        return _take(ds.train, 3)

    assert_batches_equal(first(3), first(3))
    with pytest.raises(AssertionError):
        assert_batches_equal(first(3), first(4))


def test_training_order_follows_data_shuffle_seed_not_the_run_seed(embedded_workdir):
    """The trainer's batches depend on `data.shuffle_seed` only: `seed` (initialisation)
    and the data order can be varied apart."""
    from ling_jax.train.trainer import _process_datasets

    def first(seed, shuffle_seed):
        config = ml_collections.ConfigDict(
            {"seed": seed, "data": tiny_config(), "train": {"batch_size": 2}}
        )
        config.data.shuffle_seed = shuffle_seed
        return _take(_process_datasets(config, embedded_workdir, 0, 1).train, 3)

    assert_batches_equal(first(0, 3), first(7, 3))
    with pytest.raises(AssertionError):
        assert_batches_equal(first(0, 3), first(0, 4))


def test_resume_from_saved_state(embedded_workdir):
    # Background threads on, as in a real run.
    cfg = tiny_config(read_threads=2, batch_prefetch=2)
    train = data.build_datasets(cfg, workdir=embedded_workdir, batch_size=2).train
    it = iter(train)
    for _ in range(5):
        next(it)
    state = json_roundtrip(it.get_state())
    expected = [next(it) for _ in range(4)]
    it.close()
    # A fresh build, as after a restart.
    restored = iter(data.build_datasets(cfg, workdir=embedded_workdir, batch_size=2).train)
    restored.set_state(state)
    assert_batches_equal([next(restored) for _ in range(4)], expected)
    restored.close()


def test_row_shuffle_window_permutes_rows_within_windows_and_resumes(embedded_workdir):
    """Each window of packed rows is a permutation of the unshuffled rows; a state saved
    mid-window resumes to the same batches."""

    def rows(window, n=16):
        cfg = tiny_config(embedded_arithmetic_fraction=0.0, row_shuffle_window=window)
        train = data.build_datasets(cfg, workdir=embedded_workdir, batch_size=1).train
        return [tuple(b["input_ids"][0].tolist()) for b in _take(train, n)]

    plain, shuffled = rows(0), rows(8)
    assert sorted(plain[:8]) == sorted(shuffled[:8]) and sorted(plain[8:]) == sorted(shuffled[8:])
    assert plain != shuffled

    cfg = tiny_config(row_shuffle_window=8)
    train = data.build_datasets(cfg, workdir=embedded_workdir, batch_size=2).train
    it = iter(train)
    for _ in range(3):  # 6 rows: mid-way through the first stdlib window.
        next(it)
    state = json_roundtrip(it.get_state())
    expected = [next(it) for _ in range(5)]
    restored = iter(data.build_datasets(cfg, workdir=embedded_workdir, batch_size=2).train)
    restored.set_state(state)
    assert_batches_equal([next(restored) for _ in range(5)], expected)


def test_validation_is_finite_and_repeatable(embedded_workdir):
    cfg = tiny_config(validation_max_batches=3)
    validation = data.build_datasets(cfg, workdir=embedded_workdir, batch_size=2).validation
    first, second = list(validation), list(validation)
    assert len(first) == 3
    assert_batches_equal(first, second)
    # A different training seed leaves validation unchanged.
    other = data.build_datasets(cfg, workdir=embedded_workdir, batch_size=2, seed=9).validation
    assert_batches_equal(list(other), first)


def test_processes_read_disjoint_documents(tmp_path):
    _write_docs(tmp_path / "docs", "doc", 60)
    cfg = _files_config(str(tmp_path / "docs" / "*.jsonl"), num_epochs=1, validation_fraction=0.2)
    seen, held_out = [], []
    for p in range(2):
        train, validation, tok = data.build_datasets(
            cfg, workdir=str(tmp_path), batch_size=1, process_index=p, process_count=2
        )
        seen.append(_tags(train, tok, "doc"))
        held_out.append(_tags(validation, tok, "doc"))
    for tags in seen + held_out:
        assert len(tags) == len(set(tags))  # One epoch: every document once.
    train0, train1 = set(seen[0]), set(seen[1])
    validation = set(held_out[0]) | set(held_out[1])
    assert not train0 & train1 and not set(held_out[0]) & set(held_out[1])
    assert not (train0 | train1) & validation
    assert train0 | train1 | validation == {f"doc-{i:03d}" for i in range(60)}
    assert 4 <= len(validation) <= 20


def test_validation_files_and_padding(tmp_path):
    _write_docs(tmp_path / "train", "tr", 20)
    _write_docs(tmp_path / "val", "va", 9, files=1)
    cfg = _files_config(str(tmp_path / "train" / "*.jsonl"))
    cfg.validation_files = str(tmp_path / "val" / "*.jsonl")
    train, validation, tok = data.build_datasets(cfg, workdir=str(tmp_path), batch_size=4)
    batches = list(validation)
    assert sorted(_tags(batches, tok, "va")) == [f"va-{i:03d}" for i in range(9)]
    for batch in batches:
        check_rows(batch, seq_len=cfg.seq_len, pad_id=tok.pad_id)
        assert batch["input_ids"].shape == (4, cfg.seq_len)
    assert_batches_equal(batches, list(validation))
    # A fixed count pads with all-masked batches, so every host runs the same eval steps.
    cfg.validation_max_batches = len(batches) + 2
    padded = list(data.build_datasets(cfg, workdir=str(tmp_path), batch_size=4).validation)
    assert len(padded) == len(batches) + 2
    assert_batches_equal(padded[: len(batches)], batches)
    assert padded[-1]["loss_mask"].sum() == 0


def test_mixture_weights_rows(tmp_path):
    _write_docs(tmp_path / "a", "aa", 30)
    _write_docs(tmp_path / "b", "bb", 30)
    cfg = _files_config("", mixture=f"{tmp_path}/a/*.jsonl:3,{tmp_path}/b/*.jsonl:1")
    train, _, tok = data.build_datasets(cfg, workdir=str(tmp_path), batch_size=4)
    rows = [tok.decode(r) for b in _take(train, 10) for r in b["input_ids"]]
    from_a = sum("aa-" in r and "bb-" not in r for r in rows)
    from_b = sum("bb-" in r and "aa-" not in r for r in rows)
    assert from_a + from_b == 40  # Components are packed separately.
    assert 27 <= from_a <= 33


def test_held_out_validation_follows_the_mixture_weights(tmp_path):
    # Equally many documents in both components, weighted 3:1: validation mixes their rows 3:1
    # as training does, not 1:1 as the held-out documents alone would.
    _write_docs(tmp_path / "a", "aa", 400)
    _write_docs(tmp_path / "b", "bb", 400)
    cfg = _files_config(
        "", mixture=f"{tmp_path}/a/*.jsonl:3,{tmp_path}/b/*.jsonl:1", validation_fraction=0.5
    )
    _, validation, tok = data.build_datasets(cfg, workdir=str(tmp_path), batch_size=4)
    batches = list(validation)
    rows = [
        tok.decode(ids[seg > 0])
        for b in batches
        for ids, seg in zip(b["input_ids"], b["segment_ids"], strict=True)
    ]
    rows = [r for r in rows if r]
    from_a = sum("aa-" in r and "bb-" not in r for r in rows)
    from_b = sum("bb-" in r and "aa-" not in r for r in rows)
    assert from_a + from_b == len(rows)  # Components are packed separately, as in training.
    assert 2.7 <= from_a / from_b <= 3.3
    # Every prefix is mixed alike, so a capped evaluation (eval.max_batches) is too.
    head = rows[:40]
    assert 27 <= sum("aa-" in r for r in head) <= 33
    # "aa" runs out first (3x the rows, as many documents): every held-out "aa" document is
    # read once, in one stream of rows, and nothing else of its component; "bb" is cut short.
    components, sources = pipeline.build_sources(cfg)
    held_out = {s.documents[i].split()[0] for s in sources for i in range(len(s.documents))}
    trained = {c.train[i].split()[0] for c in components for i in range(len(c.train))}
    assert not held_out & trained
    a_stream = [r for r in rows if "aa-" in r]
    a_tags = re.findall(r"aa-\d+", "".join(a_stream))
    assert sorted(a_tags) == sorted(t for t in held_out if t.startswith("aa-"))
    b_tags = re.findall(r"bb-\d+", "".join(r for r in rows if "bb-" in r))
    assert len(b_tags) == len(set(b_tags)) and set(b_tags) < held_out
    assert_batches_equal(batches, list(validation))


def test_embedded_validation_has_the_training_arithmetic_share(embedded_workdir):
    # Held out by documents, the embedded validation split would hold far more arithmetic
    # (short, easy documents) than the 10% of training rows; it follows the training share.
    cfg = tiny_config(validation_max_batches=20)
    _, validation, tok = data.build_datasets(cfg, workdir=embedded_workdir, batch_size=8)
    tokens = {True: 0, False: 0}
    for batch in validation:
        for ids, seg in zip(batch["input_ids"], batch["segment_ids"], strict=True):
            if (seg > 0).any():
                text = tok.decode(ids[seg > 0])
                tokens[ARITHMETIC.fullmatch(text) is not None] += int((seg > 0).sum())
    share = tokens[True] / (tokens[True] + tokens[False])
    assert abs(share - cfg.embedded_arithmetic_fraction) < 0.02, share


def test_epochs_end_the_training_set(tmp_path):
    _write_docs(tmp_path / "docs", "doc", 20)
    (tmp_path / "docs" / "empty.jsonl").write_text('{"text": ""}\n')  # Skipped: no target.
    cfg = _files_config(str(tmp_path / "docs" / "*.jsonl"), validation_fraction=0.0)
    counts = {}
    for epochs in (1, 2):
        cfg.num_epochs = epochs
        train, validation, tok = data.build_datasets(cfg, workdir=str(tmp_path), batch_size=1)
        assert validation is None
        counts[epochs] = sorted(_tags(train, tok, "doc"))
    assert counts[1] == [f"doc-{i:03d}" for i in range(20)]
    assert counts[2] == sorted(counts[1] * 2)


def test_build_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"data.train_files: glob '.*nothing-\*.jsonl'"):
        data.build_datasets(
            _files_config(str(tmp_path / "nothing-*.jsonl")), workdir=None, batch_size=1
        )
    _write_docs(tmp_path / "docs", "doc", 4)
    cfg = _files_config(str(tmp_path / "docs" / "*.jsonl"), text_key="body")
    with pytest.raises(ValueError, match="missing text key 'body'"):
        data.build_datasets(cfg, workdir=None, batch_size=1)
    with pytest.raises(ValueError, match="4 documents cannot give each of 8 processes one"):
        data.build_datasets(
            _files_config(str(tmp_path / "docs" / "*.jsonl"), validation_fraction=0.0),
            workdir=None,
            batch_size=1,
            process_index=7,
            process_count=8,
        )
    with pytest.raises(ValueError, match="process_index"):
        data.build_datasets(tiny_config(), workdir=None, batch_size=1, process_index=2)


def test_empty_validation_shard_is_padded(tmp_path):
    _write_docs(tmp_path / "docs", "doc", 6)
    cfg = _files_config(str(tmp_path / "docs" / "*.jsonl"), validation_fraction=0.01)
    cfg.validation_max_batches = 2
    sizes = []
    for p in range(2):
        validation = data.build_datasets(
            cfg, workdir=str(tmp_path), batch_size=2, process_index=p, process_count=2
        ).validation
        batches = list(validation)
        assert len(batches) == 2
        sizes.append(sum(b["loss_mask"].sum() for b in batches))
    # One document is held out: one host evaluates it, the other only padding.
    assert sorted(s > 0 for s in sizes) == [False, True]
