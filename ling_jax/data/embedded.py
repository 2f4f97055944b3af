"""The embedded default corpus: nothing to download.

Two document sources:
  stdlib      every `*.py` file of the Python standard library on this machine (found through
              `sysconfig.get_paths()["stdlib"]`), sorted by relative path, test suites and
              installed third-party packages excluded: ~700 files, ~12 MB on CPython 3.11.
  arithmetic  generated arithmetic-reasoning documents, e.g.
              "Q: 37 + 45 * 2 = ? A: 45 * 2 = 90; 37 + 90 = 127.", document `i` drawn from a
              generator seeded with (seed, i), so any document can be read in any order.

Both are `DocumentSource`s whose documents are keyed by relative path (stdlib) or index
(arithmetic), so the train/validation split is the same on every run. Stdlib files are grouped
by top-level package (`data.validation_split_by = "group"` holds out whole packages); each
arithmetic document is a group of its own.
"""

from __future__ import annotations

import os
import pathlib
import sysconfig

import numpy as np

from ling_jax.data.sources import DocumentSource, TextFileReader

# Folders skipped anywhere under the stdlib root: test suites and installed packages.
_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_OPS = ("+", "-", "*")


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: pathlib.Path | None = None) -> list[str]:
    """Relative paths of the standard library's `*.py` files, sorted (deterministic)."""
    root = stdlib_root() if root is None else root
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        rel = os.path.relpath(dirpath, root)
        files.extend(os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no *.py files under the stdlib folder {root}")
    return sorted(files)


def top_level_package(relative_path: str) -> str:
    """The top-level package of a stdlib file ("email/mime/text.py" -> "email"); a top-level
    module is its own group ("os.py")."""
    return pathlib.PurePath(relative_path).parts[0]


def stdlib_source(root: pathlib.Path | None = None) -> DocumentSource:
    """One document per standard-library source file, keyed by its relative path and grouped
    by top-level package (a group split keeps e.g. all `encodings` codecs on one side)."""
    root = stdlib_root() if root is None else root
    files = stdlib_files(root)
    return DocumentSource(
        [TextFileReader(str(root / f)) for f in files],
        names=files,
        groups=[top_level_package(f) for f in files],
    )


def arithmetic_problem(rng: np.random.Generator) -> str:
    """One problem with 2-3 operands, solved step by step (multiplications first)."""
    num_operands = int(rng.integers(2, 4))
    nums = [int(n) for n in rng.integers(0, 100, size=num_operands)]
    ops = [_OPS[int(i)] for i in rng.integers(0, len(_OPS), size=num_operands - 1)]
    question = " ".join(f"{n} {op}" for n, op in zip(nums[:-1], ops, strict=True)) + f" {nums[-1]}"
    steps = []
    for precedence in ("*", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] not in precedence:
                i += 1
                continue
            a, op, b = nums[i], ops[i], nums[i + 1]
            value = a * b if op == "*" else a + b if op == "+" else a - b
            steps.append(f"{a} {op} {b} = {value}")
            nums[i : i + 2] = [value]
            del ops[i]
    return f"Q: {question} = ? A: {'; '.join(steps)}."


class ArithmeticReader:
    """`num_records` generated documents of `problems_per_doc` lines each (a `FileReader`)."""

    path = "<arithmetic>"

    def __init__(self, num_records: int, *, seed: int = 0, problems_per_doc: int = 8):
        self.num_records = num_records
        self.seed = seed
        self.problems_per_doc = problems_per_doc

    def read(self, index: int) -> str:
        rng = np.random.default_rng([self.seed, index])
        return "\n".join(arithmetic_problem(rng) for _ in range(self.problems_per_doc)) + "\n"


def arithmetic_source(num_docs: int, *, seed: int = 0) -> DocumentSource:
    """The generated arithmetic set as a `DocumentSource` keyed by document index."""
    return DocumentSource([ArithmeticReader(num_docs, seed=seed)], names=["arithmetic"])
