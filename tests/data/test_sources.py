"""File formats, globbing and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ling_jax.data.pipeline import split_documents
from ling_jax.data.sources import (
    DocumentSource,
    document_keys,
    expand_globs,
    open_documents,
    open_reader,
    validation_mask,
)

DOCS = ["first document\nwith two lines", "second: ünïcödé ✓", "third"]


def _read_all(source: DocumentSource) -> list[str]:
    return [source[i] for i in range(len(source))]


def _write_jsonl(path, docs, key="text"):
    lines = [json.dumps({key: d, "id": i}) for i, d in enumerate(docs)]
    path.write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n")  # A blank line is skipped.


def test_text_files(tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc)
    source = open_documents(
        str(tmp_path / "*.txt"), field="train_files", file_format="auto", text_key="text"
    )
    assert _read_all(source) == DOCS


def test_jsonl(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", DOCS)
    reader = open_reader(str(tmp_path / "a.jsonl"))
    assert reader.num_records == 3
    assert [reader.read(i) for i in range(3)] == DOCS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"content": DOCS * 3, "n": list(range(9))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    reader = open_reader(str(tmp_path / "a.parquet"), text_key="content")
    assert reader.num_records == 9
    assert [reader.read(i) for i in (8, 0, 5, 3)] == [DOCS[2], DOCS[0], DOCS[2], DOCS[0]]
    with pytest.raises(ValueError, match="missing text column 'text'"):
        open_reader(str(tmp_path / "a.parquet"))


def test_arrayrecord_text_and_json(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "docs.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    writer.write(DOCS[0].encode())
    writer.write(json.dumps({"text": DOCS[1]}).encode())
    writer.write(b"{not json, so plain text")
    writer.close()
    reader = open_reader(path)
    assert [reader.read(i) for i in range(3)] == [DOCS[0], DOCS[1], "{not json, so plain text"]


def test_arrayrecord_missing_key(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "docs.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    writer.write(json.dumps({"body": "x"}).encode())
    writer.close()
    with pytest.raises(ValueError, match="missing text key 'text'.*body"):
        open_reader(path)


def test_mixed_formats_in_one_glob(tmp_path):
    (tmp_path / "a.txt").write_text("plain")
    _write_jsonl(tmp_path / "b.jsonl", ["j0", "j1"])
    source = open_documents(
        str(tmp_path / "*"), field="train_files", file_format="auto", text_key="text"
    )
    assert _read_all(source) == ["plain", "j0", "j1"]
    assert _read_all(source.subset(np.array([2, 0]))) == ["j1", "plain"]


def test_glob_matching_nothing_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"data.validation_files: glob '.*\*.jsonl' matched no"):
        expand_globs(f"{tmp_path}/a.txt, {tmp_path}/*.jsonl", "validation_files")
    assert expand_globs(f"{tmp_path}/a.txt,{tmp_path}/*.txt") == [f"{tmp_path}/a.txt"]


def test_missing_key_and_bad_json_name_file_and_line(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", DOCS, key="body")
    with pytest.raises(ValueError, match=r"a.jsonl:1: missing text key 'text'"):
        open_reader(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    reader = open_reader(str(tmp_path / "b.jsonl"))
    with pytest.raises(ValueError, match=r"b.jsonl:2: not a JSON object"):
        reader.read(1)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="cannot read data file .*bad.parquet"):
        open_reader(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match="cannot read data file .*missing.txt"):
        open_reader(str(tmp_path / "missing.txt"))
    (tmp_path / "x.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match="compressed"):
        open_reader(str(tmp_path / "x.jsonl.gz"))


def test_document_keys_are_stable_and_split_evenly():
    keys = document_keys("shard-00000.jsonl", 20_000)
    np.testing.assert_array_equal(keys, document_keys("shard-00000.jsonl", 20_000))
    assert len(set(keys.tolist())) == len(keys)
    assert not np.array_equal(keys[:100], document_keys("shard-00001.jsonl", 100))
    held_out = validation_mask(keys, 0.1)
    assert 0.09 < held_out.mean() < 0.11
    # Keys of a prefix do not depend on how many records the file has.
    np.testing.assert_array_equal(keys[:10], document_keys("shard-00000.jsonl", 10))


def test_group_split_keeps_each_file_on_one_side(tmp_path):
    for shard in range(12):
        _write_jsonl(tmp_path / f"shard-{shard:02d}.jsonl", [f"doc {shard}.{i}" for i in range(5)])
    source = open_documents(
        str(tmp_path / "*.jsonl"), field="f", file_format="auto", text_key="text"
    )
    train, held_out = split_documents(source, 0.3, by="group")
    shards = lambda part: {part[i].split(".")[0] for i in range(len(part))}
    assert not shards(train) & shards(held_out)
    assert len(held_out) % 5 == 0 and 0 < len(held_out) < len(source)
    # Split by document, the shards straddle.
    by_doc_train, by_doc_held_out = split_documents(source, 0.3)
    assert shards(by_doc_train) & shards(by_doc_held_out)


def test_group_split_of_a_single_group_is_refused(tmp_path):
    _write_jsonl(tmp_path / "only.jsonl", DOCS)
    source = open_documents(
        str(tmp_path / "only.jsonl"), field="f", file_format="auto", text_key="text"
    )
    with pytest.raises(ValueError, match="single group.*validation_files"):
        split_documents(source, 0.3, by="group")
