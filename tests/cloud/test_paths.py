"""The path layer on local disk and on the GCS emulator."""

from __future__ import annotations

import os
import re

import pytest

from ling_jax.io import paths


def test_urls_are_never_made_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve("gs://b/x") == "gs://b/x"
    assert paths.resolve("gs://b/x/") == "gs://b/x"
    assert paths.resolve("run") == os.path.join(str(tmp_path), "run")
    assert paths.resolve("~/run") == os.path.join(os.path.expanduser("~"), "run")
    assert paths.join("gs://b/x", "checkpoints", "2") == "gs://b/x/checkpoints/2"
    assert paths.join("gs://b/x/", "/tokenizer") == "gs://b/x/tokenizer"
    assert paths.basename("gs://b/x/f.jsonl") == "f.jsonl"
    assert paths.dirname("gs://b/x/f.jsonl") == "gs://b/x"
    assert paths.is_remote("gs://b") and not paths.is_remote("/tmp/gs:/b")


def _exercise(root: str) -> None:
    """The same operations on a local folder and on a bucket."""
    paths.makedirs(paths.join(root, "data", "sub"))
    for name in ("b.txt", "a.txt", "sub/c.txt"):
        with paths.open_file(paths.join(root, "data", name), "w") as f:
            f.write(f"text of {name}")
    paths.write_text(paths.join(root, "meta.json"), '{"k": 1}')
    assert paths.read_text(paths.join(root, "meta.json")) == '{"k": 1}'
    assert paths.read_bytes(paths.join(root, "data", "a.txt")) == b"text of a.txt"
    assert paths.glob(paths.join(root, "data", "*.txt")) == [
        paths.join(root, "data", "a.txt"),
        paths.join(root, "data", "b.txt"),
    ]
    assert paths.glob(paths.join(root, "data", "**", "c.txt")) == [
        paths.join(root, "data", "sub", "c.txt")
    ]
    assert paths.listdir(paths.join(root, "data")) == ["a.txt", "b.txt", "sub"]
    assert paths.isdir(paths.join(root, "data", "sub"))
    assert paths.isfile(paths.join(root, "data", "a.txt"))
    paths.copytree(paths.join(root, "data"), paths.join(root, "copy"))
    assert paths.read_text(paths.join(root, "copy", "sub", "c.txt")) == "text of sub/c.txt"
    paths.remove(paths.join(root, "data", "b.txt"))
    assert not paths.exists(paths.join(root, "data", "b.txt"))
    pattern = paths.join(root, "data", "*.parquet")
    with pytest.raises(FileNotFoundError, match=re.escape(f"glob '{pattern}' matched no files")):
        paths.glob(pattern)


def test_local_operations(tmp_path):
    _exercise(str(tmp_path))


def test_bucket_operations(bucket):
    _exercise(paths.join(bucket, "layer"))


def test_missing_bucket_names_the_path(gcs_emulator):
    with pytest.raises(FileNotFoundError, match="gs://no-such-bucket/x.txt"):
        paths.read_text("gs://no-such-bucket/x.txt")
    with pytest.raises(OSError, match="gs://no-such-bucket/y.txt"):
        paths.write_text("gs://no-such-bucket/y.txt", "text")
    with pytest.raises(FileNotFoundError, match="bucket gs://no-such-bucket does not exist"):
        paths.makedirs("gs://no-such-bucket/run")
    with pytest.raises(FileNotFoundError, match=re.escape("gs://no-such-bucket/*.jsonl")):
        paths.glob("gs://no-such-bucket/*.jsonl")
