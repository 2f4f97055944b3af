"""The `data` config section: defaults validate, bad fields are named."""

from __future__ import annotations

import pytest

from ling_jax import data
from ling_jax.data.config import MixtureComponent, parse_mixture


def test_default_config_validates():
    cfg = data.default_data_config()
    assert data.validate_data_config(cfg) is cfg
    assert cfg.source == "embedded"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("source", "web"),
        ("file_format", "csv"),
        ("text_key", ""),
        ("seq_len", 1),
        ("validation_fraction", 1.0),
        ("embedded_arithmetic_fraction", -0.1),
        ("bpe_vocab_size", 100),
        ("shuffle_seed", -1),
        ("num_epochs", -1),
        ("read_threads", 0),
        ("validation_max_batches", -2),
        ("validation_split_by", "file"),
        ("row_shuffle_window", -1),
    ],
)
def test_bad_field_is_named(field, value):
    cfg = data.default_data_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=f"data.{field}`"):
        data.validate_data_config(cfg)


def test_embedded_source_rejects_globs():
    cfg = data.default_data_config()
    cfg.train_files = "a/*.txt"
    with pytest.raises(ValueError, match="data.train_files"):
        data.validate_data_config(cfg)


def test_files_source_needs_globs():
    cfg = data.default_data_config()
    cfg.source = "files"
    with pytest.raises(ValueError, match="data.train_files"):
        data.validate_data_config(cfg)
    cfg.train_files = "a/*.txt"
    cfg.mixture = "b/*.txt:1"
    with pytest.raises(ValueError, match="data.mixture"):
        data.validate_data_config(cfg)


def test_parse_mixture():
    assert parse_mixture("a/*.jsonl:0.7, gs://b/*.txt:0.3") == [
        MixtureComponent("a/*.jsonl", 0.7),
        MixtureComponent("gs://b/*.txt", 0.3),
    ]
    for bad in ("a/*.jsonl", "a/*.jsonl:x", "a:0", ":1", ","):
        with pytest.raises(ValueError, match="data.mixture"):
            parse_mixture(bad)
