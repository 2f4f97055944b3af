"""Random-access document sources over user files: text, JSONL, Parquet and ArrayRecord.

A `DocumentSource` is a grain `RandomAccessDataSource` of documents (`str`): `len(source)` and
`source[i]`. It concatenates one reader per file; each reader knows how many documents its file
holds and reads any one of them. Readers open files lazily and drop handles when pickled, so a
source can travel to grain worker processes.

Every document has a stable 64-bit key, a hash of (file name, record index), used to split
documents between training and validation the same way on every run and every host
(`validation_mask`). Files may also belong to named groups (a package of source files, one
file of records) whose documents share a key (`group_keys`), so that a split can hold out
whole groups: near-duplicate documents of one group then never straddle the split.
"""

from __future__ import annotations

import collections
import hashlib
import json
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ling_jax.io import paths

# Extensions that "auto" maps to a structured format; anything else is read as plain text.
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")


class FileReader(Protocol):
    """Reads the documents of one file."""

    path: str
    num_records: int

    def read(self, index: int) -> str: ...


def _open_error(path: str, err: Exception) -> ValueError:
    return ValueError(f"cannot read data file {path!r}: {err}")


def _text_from_json(obj, key: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with key {key!r}, got {type(obj)}")
    if key not in obj:
        raise ValueError(
            f"{where}: missing text key {key!r} (data.text_key); keys are {sorted(obj)[:20]}"
        )
    text = obj[key]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ValueError(f"{where}: value of {key!r} is {type(text).__name__}, expected a string")
    return text


class TextFileReader:
    """A plain text file is one document (decoded as UTF-8, bad bytes replaced)."""

    num_records = 1

    def __init__(self, path: str):
        self.path = path
        try:
            with paths.open_file(path, "rb"):
                pass
        except OSError as e:
            raise _open_error(path, e) from e

    def read(self, index: int) -> str:
        del index
        return paths.read_bytes(self.path).decode("utf-8", errors="replace")


class JsonlReader:
    """One JSON object per non-empty line; the document is `obj[text_key]`.

    Opening scans the file once for line offsets; local reads use `os.pread`, which is
    thread-safe; a file in a bucket is read with seek + read on one handle under the lock.
    """

    def __init__(self, path: str, text_key: str):
        self.path = path
        self.text_key = text_key
        try:
            size, newlines = (_remote_newlines if paths.is_remote(path) else _local_newlines)(path)
        except OSError as e:
            raise _open_error(path, e) from e
        starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
        ends = np.concatenate([newlines, [size]]).astype(np.int64)
        keep = ends > starts  # Skip empty lines (and the empty tail after a final newline).
        self._starts, self._lengths = starts[keep], (ends - starts)[keep]
        self._line_numbers = np.flatnonzero(keep) + 1
        self.num_records = len(self._starts)
        self._fd: int | None = None
        self._lock = threading.Lock()
        if self.num_records:
            self.read(0)  # Surface a bad format or a missing key now, not mid-training.

    def _read_line(self, index: int) -> bytes:
        length, start = int(self._lengths[index]), int(self._starts[index])
        with self._lock:
            if self._fd is None:
                self._fd = (
                    paths.open_file(self.path, "rb")
                    if paths.is_remote(self.path)
                    else os.open(self.path, os.O_RDONLY)
                )
            if isinstance(self._fd, int):
                fd = self._fd
            else:
                self._fd.seek(start)
                return self._fd.read(length)
        return os.pread(fd, length, start)

    def read(self, index: int) -> str:
        raw = self._read_line(index)
        where = f"{self.path}:{self._line_numbers[index]}"
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{where}: not a JSON object ({e})") from e
        return _text_from_json(obj, self.text_key, where)

    def __getstate__(self):
        state = dict(self.__dict__, _fd=None)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if isinstance(fd, int):
            os.close(fd)
        elif fd is not None:
            fd.close()


_SCAN_CHUNK = 16 << 20


def _local_newlines(path: str) -> tuple[int, np.ndarray]:
    """(size, offsets of every "\\n") of a local file, through a memory map."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            return 0, np.zeros((0,), np.int64)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return size, np.flatnonzero(np.frombuffer(m, np.uint8) == ord("\n"))


def _remote_newlines(path: str) -> tuple[int, np.ndarray]:
    """(size, offsets of every "\\n") of a file in a bucket, streamed in chunks."""
    found, size = [], 0
    with paths.open_file(path, "rb") as f:
        while chunk := f.read(_SCAN_CHUNK):
            found.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")) + size)
            size += len(chunk)
    return size, (np.concatenate(found) if found else np.zeros((0,), np.int64))


class ParquetReader:
    """Column `text_key` of a Parquet file, one document per row.

    Reads whole row groups and keeps the last few decoded, so a shuffled order that jumps
    between row groups re-reads them: for large shuffled corpora prefer ArrayRecord.
    """

    _CACHED_ROW_GROUPS = 4

    def __init__(self, path: str, text_key: str):
        pq = _import_parquet()
        self.path = path
        self.text_key = text_key
        try:
            meta = pq.ParquetFile(_parquet_input(path)).metadata
        except Exception as e:  # pyarrow raises its own error types.
            raise _open_error(path, e) from e
        columns = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if text_key not in columns:
            raise ValueError(
                f"{path}: missing text column {text_key!r} (data.text_key); columns are {columns}"
            )
        rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._group_ends = np.cumsum(rows, dtype=np.int64)
        self.num_records = int(self._group_ends[-1]) if rows else 0
        self._file = None
        self._cache: collections.OrderedDict[int, list] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _row_group(self, group: int) -> list:
        with self._lock:
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
            if self._file is None:
                self._file = _import_parquet().ParquetFile(_parquet_input(self.path))
            column = self._file.read_row_group(group, columns=[self.text_key])[self.text_key]
            values = column.to_pylist()
            self._cache[group] = values
            if len(self._cache) > self._CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
            return values

    def read(self, index: int) -> str:
        group = int(np.searchsorted(self._group_ends, index, side="right"))
        start = int(self._group_ends[group - 1]) if group else 0
        text = self._row_group(group)[index - start]
        if text is None:
            return ""
        if not isinstance(text, str):
            raise ValueError(f"{self.path}: column {self.text_key!r} holds {type(text)}, not str")
        return text

    def __getstate__(self):
        state = dict(self.__dict__, _file=None, _cache=collections.OrderedDict())
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _parquet_input(path: str):
    """pyarrow opens local paths itself; a bucket's file goes in as a seekable file object."""
    return paths.open_file(path, "rb") if paths.is_remote(path) else path


def _import_parquet():
    try:
        import pyarrow.parquet as pq  # Optional dependency, needed only for Parquet files.
    except ImportError as e:
        raise ImportError("reading Parquet files needs pyarrow: pip install pyarrow") from e
    return pq


class ArrayRecordReader:
    """Records of an ArrayRecord file: UTF-8 text, or a JSON object holding `text_key`.

    A record whose first non-blank byte is `{` and that parses as a JSON object is read as
    JSON; any other record is the document itself.
    """

    def __init__(self, path: str, text_key: str):
        from grain import sources as grain_sources

        self.path = path
        self.text_key = text_key
        try:
            # The ArrayRecord reader does not go through gcsfs (against an emulator it hangs):
            # a file in a bucket is read from a local copy.
            self._source = grain_sources.ArrayRecordDataSource([paths.local_copy(path)])
            self.num_records = len(self._source)
        except Exception as e:  # The C++ reader raises generic errors.
            raise _open_error(path, e) from e
        if self.num_records:
            self.read(0)

    def read(self, index: int) -> str:
        raw = self._source[index]
        text = raw.decode("utf-8", errors="replace")
        if text.lstrip().startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError:
                return text
            return _text_from_json(obj, self.text_key, f"{self.path}[{index}]")
        return text


def _format_of(path: str, file_format: str) -> str:
    if file_format != "auto":
        return file_format
    name = paths.basename(path).lower()
    if name.endswith(_COMPRESSED_SUFFIXES):
        raise ValueError(f"{path}: compressed files are not supported; decompress it first")
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if "array_record" in name or name.endswith(".arrayrecord"):
        return "arrayrecord"
    return "text"


def open_reader(path: str, file_format: str = "auto", text_key: str = "text") -> FileReader:
    """Opens one file with the reader for `file_format` ("auto" picks by file name)."""
    fmt = _format_of(path, file_format)
    if fmt == "text":
        return TextFileReader(path)
    if fmt == "jsonl":
        return JsonlReader(path, text_key)
    if fmt == "parquet":
        return ParquetReader(path, text_key)
    if fmt == "arrayrecord":
        return ArrayRecordReader(path, text_key)
    raise ValueError(f"unknown file format {fmt!r} for {path}")


def expand_globs(spec: str, field: str = "train_files") -> list[str]:
    """Files matched by comma-separated globs, sorted within each glob, without repeats.

    Raises a ValueError naming the field and the glob when a glob matches no file. Globs may
    name local files or a bucket's (`gs://bucket/corpus/*.jsonl`).
    """
    found: dict[str, None] = {}
    for pattern in (p.strip() for p in spec.split(",")):
        if not pattern:
            continue
        try:
            matches = paths.glob(pattern)
        except FileNotFoundError as error:
            raise ValueError(f"data.{field}: {error}") from error
        found.update(dict.fromkeys(matches))
    if not found:
        raise ValueError(f"data.{field} = {spec!r} names no glob")
    return list(found)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective, well-mixed hash of uint64 values."""
    x = x.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def name_hash(name: str) -> int:
    """A stable 64-bit hash of a string (unlike `hash`, the same in every process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def document_keys(name: str, num_records: int) -> np.ndarray:
    """Stable keys of the records of one file: [num_records] uint64."""
    records = _mix64(np.arange(num_records, dtype=np.uint64) + np.uint64(1))
    return _mix64(records ^ np.uint64(name_hash(name)))


def validation_mask(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents are held out: the keys whose hash falls in the lowest `fraction`."""
    unit = (keys >> np.uint64(11)).astype(np.float64) / float(2**53)  # Uniform in [0, 1).
    return unit < fraction


class DocumentSource:
    """Documents of several readers, optionally restricted to a subset of indices.

    Implements grain's `RandomAccessDataSource`: `len(source)` and `source[i] -> str`.
    """

    def __init__(
        self,
        readers: Sequence[FileReader],
        indices: np.ndarray | None = None,
        names: Sequence[str] | None = None,
        groups: Sequence[str | None] | None = None,
    ):
        self.readers = list(readers)
        # Names that key the split; file names by default so that moving a dataset keeps it.
        self.names = list(names) if names is not None else [paths.basename(r.path) for r in readers]
        # The group of each file (None: each of its documents is a group of its own).
        self.groups = list(groups) if groups is not None else [None] * len(self.readers)
        if len(self.names) != len(self.readers) or len(self.groups) != len(self.readers):
            raise ValueError(
                f"{len(self.readers)} readers but {len(self.names)} names and "
                f"{len(self.groups)} groups"
            )
        counts = np.array([r.num_records for r in self.readers], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self._total = int(self._ends[-1]) if len(counts) else 0
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return self._total if self._indices is None else len(self._indices)

    def __getitem__(self, index: int) -> str:
        if self._indices is not None:
            index = int(self._indices[index])
        reader = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[reader - 1]) if reader else 0
        return self.readers[reader].read(index - start)

    def keys(self) -> np.ndarray:
        """Stable per-document keys, [len(self)] uint64, from (file name, record index)."""
        return self._select(
            document_keys(n, r.num_records) for n, r in zip(self.names, self.readers, strict=True)
        )

    def group_keys(self) -> np.ndarray:
        """[len(self)] uint64: one key per group, shared by all its documents (a hash of the
        group's name); a document of a file without a group keeps its own key."""
        return self._select(
            document_keys(n, r.num_records)
            if g is None
            else np.repeat(_mix64(np.array([name_hash(g)], np.uint64)), r.num_records)
            for n, g, r in zip(self.names, self.groups, self.readers, strict=True)
        )

    def _select(self, per_file_keys) -> np.ndarray:
        """The files' keys concatenated, restricted to this source's documents."""
        keys = np.concatenate([np.zeros((0,), np.uint64), *per_file_keys])
        return keys if self._indices is None else keys[self._indices]

    def subset(self, indices: np.ndarray) -> DocumentSource:
        """The documents at `indices` (positions in this source), sharing its readers."""
        indices = np.asarray(indices, dtype=np.int64)
        base = indices if self._indices is None else self._indices[indices]
        return DocumentSource(self.readers, base, self.names, self.groups)

    def __repr__(self) -> str:
        return f"DocumentSource({len(self.readers)} files, {len(self)} documents)"


def open_documents(spec: str, *, field: str, file_format: str, text_key: str) -> DocumentSource:
    """All documents of the files matched by `spec` (comma-separated globs); each file is a
    group (`group_keys`)."""
    readers = [open_reader(p, file_format, text_key) for p in expand_globs(spec, field)]
    names = [paths.basename(r.path) for r in readers]
    return DocumentSource(readers, names=names, groups=names)
