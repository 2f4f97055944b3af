"""Long documents are tokenized chunk by chunk; a corpus without a usable document is refused."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from ling_jax import data
from ling_jax.data.chunking import LongDocument, ReadDocument, tokenized_examples
from ling_jax.data.sources import DocumentSource, TextFileReader
from tests.data.helpers import assert_batches_equal, check_rows, json_roundtrip, tiny_config

CHUNK = 4096


def _long_text(small_docs, chars: int) -> str:
    text = "\n".join(small_docs)
    return (text * (chars // len(text) + 1))[:chars]


def test_long_document_is_tokenized_in_bounded_chunks(small_docs, small_tokenizer, tmp_path):
    path = tmp_path / "one.txt"
    text = _long_text(small_docs, 2_000_000)
    path.write_text(text)
    source = DocumentSource([TextFileReader(str(path))])
    # The read-ahead buffer keeps only the long document's index, not its text or tokens.
    read = ReadDocument(source, small_tokenizer, add_eos=True, max_chars=CHUNK)
    assert read.map(0) == LongDocument(0)

    encoded_lengths = []
    encode = small_tokenizer.encode

    def recording_encode(s):
        encoded_lengths.append(len(s))
        return encode(s)

    read.tokenize.tokenizer.encode = recording_encode  # The shared tokenizer, restored below.
    try:
        examples = iter(
            tokenized_examples(
                grain.MapDataset.range(1),
                source,
                small_tokenizer,
                add_eos=True,
                max_chars=CHUNK,
                read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=4),
            )
        )
        first = next(examples)
        # The first example came after tokenizing one chunk (and a few characters of the next),
        # not the whole 2 MB.
        assert len(first["input_ids"]) > 0 and sum(encoded_lengths) <= CHUNK + 64
        rest = list(examples)
    finally:
        del small_tokenizer.encode
    assert max(encoded_lengths) <= CHUNK
    chunks = [first, *rest]
    assert len(chunks) == -(-len(text) // CHUNK)
    inputs = np.concatenate([c["input_ids"] for c in chunks])
    targets = np.concatenate([c["targets"] for c in chunks])
    # Together the chunks are the document, shifted once: each target is the next input (also
    # across chunk boundaries), and the last is EOS.
    assert small_tokenizer.decode(inputs) == text
    np.testing.assert_array_equal(targets[:-1], inputs[1:])
    assert targets[-1] == small_tokenizer.eos_id
    for c in chunks:
        np.testing.assert_array_equal(c["target_bytes"], small_tokenizer.token_bytes[c["targets"]])


def test_single_long_document_trains_and_resumes(small_docs, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text(_long_text(small_docs, 1_000_000))
    cfg = tiny_config(
        source="files",
        train_files=str(tmp_path / "docs" / "*.txt"),
        validation_fraction=0.0,
        document_chunk_chars=CHUNK,
        batch_prefetch=2,
    )
    cfg.bpe_vocab_size = 280
    train, _, tokenizer = data.build_datasets(cfg, workdir=str(tmp_path / "run"), batch_size=2)
    it = iter(train)
    head = [next(it) for _ in range(3)]
    for batch in head:
        check_rows(batch, seq_len=cfg.seq_len, pad_id=tokenizer.pad_id)
    # Stop in the middle of the long document (a chunk is ~100 rows here) and resume there.
    for _ in range(150):
        next(it)
    state = json_roundtrip(it.get_state())
    expected = [next(it) for _ in range(3)]
    restored = iter(train)
    restored.set_state(state)
    assert_batches_equal([next(restored) for _ in range(3)], expected)


@pytest.mark.parametrize("kind", ["empty_text_files", "jsonl_without_text"])
def test_corpus_without_usable_document_is_refused(kind, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    if kind == "empty_text_files":
        for name in ("a.txt", "b.txt", "c.txt"):
            (folder / name).write_text("")
        pattern = str(folder / "*.txt")
    else:
        for name in ("a.jsonl", "b.jsonl"):
            rows = [{"text": ""}, {"text": None}, {"text": ""}]
            (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        pattern = str(folder / "*.jsonl")
    cfg = tiny_config(source="files", train_files=pattern, validation_max_batches=0)
    cfg.bpe_vocab_size = 280
    with pytest.raises(ValueError, match="no usable document") as error:
        data.build_datasets(cfg, workdir=str(tmp_path / "run"), batch_size=2)
    assert pattern in str(error.value) and str(folder / "a.") in str(error.value)
