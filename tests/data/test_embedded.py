"""The embedded corpus: non-trivial, deterministic, and split the same way every time."""

from __future__ import annotations

import re

import numpy as np

from ling_jax.data import embedded
from ling_jax.data.pipeline import split_documents


def test_stdlib_corpus_is_substantial_and_sorted():
    files = embedded.stdlib_files()
    assert len(files) > 100
    assert files == sorted(files)
    assert not any({"test", "tests", "site-packages"} & set(f.split("/")[:-1]) for f in files)
    root = embedded.stdlib_root()
    assert sum((root / f).stat().st_size for f in files) > 1_000_000


def test_stdlib_split_is_disjoint_complete_and_stable():
    source = embedded.stdlib_source()
    train, held_out = split_documents(source, 0.05)
    train_keys, val_keys = set(train.keys().tolist()), set(held_out.keys().tolist())
    assert not train_keys & val_keys
    assert len(train) + len(held_out) == len(source)
    assert 0.01 < len(held_out) / len(source) < 0.15
    # A fresh listing splits identically (keys come from relative paths, not run state).
    train2, held_out2 = split_documents(embedded.stdlib_source(), 0.05)
    assert held_out2.keys().tolist() == held_out.keys().tolist()
    assert held_out2[0] == held_out[0]
    # A larger fraction only moves documents from train to validation.
    _, more = split_documents(source, 0.2)
    assert val_keys <= set(more.keys().tolist())


def test_arithmetic_is_deterministic_and_correct():
    source = embedded.arithmetic_source(50)
    assert source[7] == embedded.arithmetic_source(50)[7]
    assert source[7] != source[8]
    problems = [line for i in range(len(source)) for line in source[i].splitlines()]
    assert len(problems) == 50 * 8
    for line in problems:
        question, answer = re.fullmatch(r"Q: (.*) = \? A: (.*)\.", line).groups()
        final = int(answer.rsplit("= ", 1)[1])
        assert final == eval(question), line  # Operands are small non-negative integers.


def test_stdlib_group_split_holds_out_whole_packages():
    source = embedded.stdlib_source()
    train, held_out = split_documents(source, 0.05, by="group")
    packages = lambda part: {embedded.top_level_package(part.names[i]) for i in part._indices}
    train_packages, held_out_packages = packages(train), packages(held_out)
    assert not train_packages & held_out_packages
    assert len(train) + len(held_out) == len(source)
    assert 3 < len(held_out_packages) < 30
    assert embedded.top_level_package("encodings/cp1250.py") == "encodings"
    assert embedded.top_level_package("os.py") == "os.py"
    again = split_documents(embedded.stdlib_source(), 0.05, by="group")[1]
    np.testing.assert_array_equal(held_out.keys(), again.keys())


def test_arithmetic_split_is_stable():
    train, held_out = split_documents(embedded.arithmetic_source(1000), 0.1)
    assert 50 < len(held_out) < 150
    again = split_documents(embedded.arithmetic_source(1000), 0.1)[1]
    np.testing.assert_array_equal(held_out.keys(), again.keys())
    # Each generated document is its own group: the group split is the document split.
    by_group = split_documents(embedded.arithmetic_source(1000), 0.1, by="group")[1]
    np.testing.assert_array_equal(held_out.keys(), by_group.keys())
