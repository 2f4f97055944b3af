"""Tokenizers: byte accounting, the training cache, tokenizer.json files, vocab checks."""

from __future__ import annotations

import json
import os

import pytest

from ling_jax.data import check_vocab, load_tokenizer
from ling_jax.data.tokenizer import EOS_TOKEN


def test_roundtrip_and_bytes(small_tokenizer):
    tok = small_tokenizer
    assert tok.vocab_size == 300
    assert tok.eos_id == tok.pad_id == tok.hf.token_to_id(EOS_TOKEN)
    text = "def héllo(x):\n    return x * 2  # ✓ 日本\n"
    ids = tok.encode(text)
    assert ids.dtype.name == "int32" and len(ids) < len(text.encode())
    assert tok.decode(ids) == text
    assert tok.num_bytes(ids) == len(text.encode("utf-8"))
    assert tok.num_bytes([tok.eos_id]) == 0


def _fail_if_called():
    raise AssertionError("the cached tokenizer should have been reused")


def test_cache_is_reused(tmp_path, small_docs):
    first = load_tokenizer("", str(tmp_path), small_docs[:10], vocab_size=280)
    cache = tmp_path / "tokenizer" / "tokenizer.json"
    mtime = os.stat(cache).st_mtime_ns
    second = load_tokenizer("", str(tmp_path), _fail_if_called, vocab_size=280)
    assert os.stat(cache).st_mtime_ns == mtime
    assert second.hf.to_str() == first.hf.to_str()
    with pytest.raises(ValueError, match="bpe_vocab_size = 512"):
        load_tokenizer("", str(tmp_path), _fail_if_called, vocab_size=512)


def test_tokenizer_json_file_and_folder(tmp_path, small_tokenizer):
    small_tokenizer.hf.save(str(tmp_path / "tokenizer.json"))
    by_file = load_tokenizer(str(tmp_path / "tokenizer.json"), None)
    assert by_file.eos_id == small_tokenizer.eos_id
    # tokenizer_config.json beside it names the special tokens.
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": EOS_TOKEN}, "pad_token": "Q"})
    )
    by_folder = load_tokenizer(str(tmp_path), None)
    assert by_folder.pad_id == small_tokenizer.hf.token_to_id("Q")
    with pytest.raises(ValueError, match="data.eos_token"):
        load_tokenizer(str(tmp_path), None, eos_token="<nope>")
    with pytest.raises(ValueError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path / "missing.json"), None)


def test_check_vocab(small_tokenizer):
    check_vocab(small_tokenizer, 300)
    with pytest.raises(ValueError, match="exceeds the model's vocab_size=256"):
        check_vocab(small_tokenizer, 256)
