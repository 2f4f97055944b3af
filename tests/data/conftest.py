"""Session fixtures: one small BPE and one embedded workdir whose tokenizer cache is shared."""

from __future__ import annotations

import pytest

from ling_jax import data
from ling_jax.data import embedded
from ling_jax.data.tokenizer import Tokenizer, load_tokenizer
from tests.data.helpers import tiny_config


@pytest.fixture(scope="session")
def small_docs() -> list[str]:
    """~100 KB of stdlib source plus a few arithmetic documents."""
    stdlib = embedded.stdlib_source()
    docs, size = [], 0
    for i in range(0, len(stdlib), 7):
        docs.append(stdlib[i])
        size += len(docs[-1])
        if size > 100_000:
            break
    arithmetic = embedded.arithmetic_source(20)
    return docs + [arithmetic[i] for i in range(len(arithmetic))]


@pytest.fixture(scope="session")
def small_tokenizer(small_docs) -> Tokenizer:
    """A 300-token byte-level BPE, trained without a cache."""
    return load_tokenizer("", None, small_docs, vocab_size=300)


@pytest.fixture(scope="session")
def embedded_workdir(tmp_path_factory) -> str:
    """A workdir whose tokenizer cache was filled by one tiny embedded build."""
    workdir = str(tmp_path_factory.mktemp("embedded_run"))
    data.build_datasets(tiny_config(), workdir=workdir, batch_size=2)
    return workdir
