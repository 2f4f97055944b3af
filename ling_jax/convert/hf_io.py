"""Safetensors files of an HF checkpoint directory: a reader over one file or shards + index,
and a writer that streams each shard tensor by tensor from its known specs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from ling_jax.io import paths

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
SAFETENSORS_DTYPES = {
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
# Dtypes that safetensors' numpy reader does not know: read from the file's bytes instead.
_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The dict of `path/config.json`; errors name the file. `path` may be a gs:// folder."""
    file = Path(paths.local_folder(os.fspath(path))) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}: {file} does not exist")
    try:
        hf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(hf).__name__}")
    return hf


class CheckpointReader(contextlib.ExitStack):
    """The safetensors files of an HF directory: one `model.safetensors`, or shards + index."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(paths.local_folder(os.fspath(path)))  # safetensors reads local files.
        index, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index.is_file():
            self.weight_map = self._read_index(index)
        elif single.is_file():
            with safe_open(single, framework="numpy") as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} nor {INDEX_FILE} in {self.path}")
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, set[str]] = {}
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index with a weight_map: {e!r}") from e
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must be a JSON object")
        for file in sorted(set(weight_map.values())):
            if not isinstance(file, str) or not (self.path / file).is_file():
                raise FileNotFoundError(f"{index} names shard {file!r}, missing from {self.path}")
        return weight_map

    def _file(self, name: str):
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = self.enter_context(safe_open(self.path / file, framework="numpy"))
        return self._handles[file]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for name, file in self.weight_map.items():
            handle = self._file(name)
            if file not in self._keys:
                self._keys[file] = set(handle.keys())
            if name not in self._keys[file]:
                raise ValueError(f"tensor {name!r} is listed in {INDEX_FILE} but not in {file}")
            shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes

    def dtypes(self) -> dict[str, str]:
        """name -> safetensors dtype ("BF16", "F8_E4M3", ...), from the headers only."""
        return {name: self._file(name).get_slice(name).get_dtype() for name in self.weight_map}

    def get(self, name: str) -> np.ndarray:
        handle = self._file(name)
        dtype = handle.get_slice(name).get_dtype()
        if dtype in _RAW_DTYPES:
            return self._get_raw(name, np.dtype(_RAW_DTYPES[dtype]))
        return handle.get_tensor(name)

    def _get_raw(self, name: str, dtype: np.dtype) -> np.ndarray:
        file = self.weight_map[name]
        if file not in self._headers:
            with open(self.path / file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self._headers[file] = (8 + n, json.loads(f.read(n)))
        base, header = self._headers[file]
        start, end = header[name]["data_offsets"]
        shape = tuple(header[name]["shape"])
        if end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name!r} in {file}: data size does not match its shape")
        data = np.fromfile(self.path / file, np.uint8, count=end - start, offset=base + start)
        return data.view(dtype).reshape(shape)


def first_names(names: set[str], n: int = 8) -> str:
    shown = sorted(names)[:n]
    return ", ".join(shown) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def plan_shards(specs: Sequence[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int):
    """Greedy split in order; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_safetensors(file: Path, specs, tensors: Iterator[tuple[str, np.ndarray]]) -> int:
    """Writes a safetensors file from its known specs, pulling one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype.name],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype in specs:
            got, array = next(tensors)
            if got != name or array.shape != shape or array.dtype != dtype:
                raise AssertionError(f"tensor stream out of step: {got} vs {name}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
    return offset


def prepare_output(path: str | os.PathLike, overwrite: bool) -> None:
    """Readies folder `path` (local or gs://) for a save: it must be empty unless `overwrite`.

    Weights of an earlier save would shadow or confuse the new index, so its weight files and
    index are removed; nothing else is touched.
    """
    path = os.fspath(path)
    paths.makedirs(path)
    entries = paths.listdir(path) if paths.isdir(path) else []
    if entries and not overwrite:
        raise FileExistsError(
            f"{path} is not empty ({first_names(set(entries), 4)}); "
            "pass overwrite=True (--overwrite) to write there"
        )
    for name in entries:
        if name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.fullmatch(name):
            paths.remove(paths.join(path, name))
