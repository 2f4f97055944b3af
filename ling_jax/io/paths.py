"""One path layer for local files and cloud URLs (`gs://bucket/...`), built on etils.epath.

Every file the jobs read or write goes through these functions, so a workdir, a data glob, a
tokenizer or a checkpoint can live on local disk or in a bucket alike. Local paths keep their
plain `os` behaviour (and are made absolute by `resolve`); URLs are never passed through
`os.path` functions, which would turn `gs://b/x` into `./gs:/b/x`. epath reaches `gs://` through
fsspec/gcsfs (or TensorFlow's gfile when TensorFlow is installed and EPATH_USE_TF is not false),
the same backend orbax uses for checkpoint metadata.

Remote failures (no credentials, an unreachable endpoint, a missing bucket) are re-raised as an
OSError whose message starts with the path, so that the user learns which path failed.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

from etils import epath

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path: str) -> bool:
    """Whether `path` is a URL (`gs://...`, `s3://...`) rather than a local path."""
    return bool(_URL.match(os.fspath(path)))


def resolve(path: str) -> str:
    """A user's path in the form every job stores: local paths absolute (with `~` expanded),
    URLs unchanged apart from a trailing slash."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """`base/part/...`; URLs are joined with "/" (never `os.path.join`, which is OS-specific)."""
    base = os.fspath(base)
    if not is_remote(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def basename(path: str) -> str:
    return (
        os.fspath(path).rstrip("/").rsplit("/", 1)[-1]
        if is_remote(path)
        else os.path.basename(path)
    )


def dirname(path: str) -> str:
    if is_remote(path):
        return os.fspath(path).rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(path)


@contextlib.contextmanager
def _named(path: str) -> Iterator[None]:
    """Re-raises a remote backend's error as an OSError naming `path`; a missing file stays a
    FileNotFoundError. Local errors already name their path and pass through unchanged."""
    if not is_remote(path):
        yield
        return
    try:
        yield
    except FileNotFoundError as error:
        if path in str(error):
            raise
        raise FileNotFoundError(f"{path}: not found ({error})") from error
    except Exception as error:  # gcsfs/aiohttp/google-auth raise many unrelated types.
        raise OSError(f"{path}: {type(error).__name__}: {error}") from error


def _epath(path: str) -> epath.Path:
    return epath.Path(os.fspath(path))


def exists(path: str) -> bool:
    with _named(path):
        return _epath(path).exists()


def isdir(path: str) -> bool:
    with _named(path):
        return _epath(path).is_dir()


def isfile(path: str) -> bool:
    with _named(path):
        return _epath(path).is_file()


def open_file(path: str, mode: str = "r") -> IO:
    """Opens `path` ("r", "rb", "w", "wb"); text modes are UTF-8. On a bucket a write lands
    as one object when the file is closed."""
    with _named(path):
        if is_remote(path):
            return _epath(path).open(mode)
        return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))  # noqa: SIM115


def read_text(path: str) -> str:
    with _named(path), open_file(path, "r") as f:
        return f.read()


def read_bytes(path: str) -> bytes:
    with _named(path), open_file(path, "rb") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Writes `text` so that readers never see a half-written file: locally through a
    temporary file and a rename, on a bucket as one object upload (atomic by itself)."""
    if is_remote(path):
        with _named(path), open_file(path, "w") as f:  # Uploaded on close, inside _named.
            f.write(text)
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def makedirs(path: str) -> None:
    """Creates `path` and its parents. Buckets have no real folders: there it checks that the
    bucket exists, so that a job fails before its work rather than at its first write."""
    if is_remote(path):
        bucket = "/".join(path.split("/", 3)[:3])
        if not exists(bucket):
            raise FileNotFoundError(f"{path}: bucket {bucket} does not exist or is not readable")
    with _named(path):
        _epath(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Sorted names of the entries of folder `path`."""
    with _named(path):
        return sorted(p.name for p in _epath(path).iterdir())


def remove(path: str) -> None:
    with _named(path):
        _epath(path).unlink()


def copy(source: str, destination: str) -> None:
    """Copies one file (either side local or remote)."""
    with _named(source), _named(destination):
        _epath(source).copy(_epath(destination), overwrite=True)


def copytree(source: str, destination: str) -> None:
    """Copies the files under folder `source` to `destination` (either side local or remote)."""
    if not is_remote(source) and not is_remote(destination):
        shutil.copytree(source, destination)
        return
    makedirs(destination)
    for name in listdir(source):
        child = join(source, name)
        if isdir(child):
            copytree(child, join(destination, name))
        else:
            copy(child, join(destination, name))


def glob(pattern: str) -> list[str]:
    """Sorted files matching `pattern` (`**` matches across folders; `~` is expanded locally).

    Raises FileNotFoundError naming the pattern when it matches no file.
    """
    if is_remote(pattern):
        matches = _remote_glob(pattern)
    else:
        local = os.path.expanduser(pattern)
        matches = [p for p in globlib.glob(local, recursive=True) if os.path.isfile(p)]
    if not matches:
        raise FileNotFoundError(f"glob {pattern!r} matched no files")
    return sorted(matches)


def _remote_glob(pattern: str) -> list[str]:
    """fsspec's glob (epath's refuses `**` on buckets); its results lack the scheme."""
    import fsspec  # epath's own gs:// backend; imported only for URLs.

    scheme = pattern.split("://", 1)[0]
    with _named(pattern):
        fs, _ = fsspec.core.url_to_fs(pattern)
        found = fs.glob(pattern, detail=True)
    return [f"{scheme}://{name}" for name, info in found.items() if info["type"] == "file"]


def local_copy(path: str) -> str:
    """A local file with the content of `path`: `path` itself if local, else a copy downloaded
    once into $LING_JAX_CACHE (default ~/.cache/ling_jax), for readers that open local files
    only. The copy is reused while its size matches the remote file's."""
    if not is_remote(path):
        return path
    cache = os.environ.get("LING_JAX_CACHE") or os.path.expanduser("~/.cache/ling_jax")
    # Keyed by the folder, so that the files of one remote folder share one local folder.
    key = hashlib.sha256(dirname(path).encode()).hexdigest()[:16]
    target = os.path.join(cache, "remote", key, basename(path))
    with _named(path):
        size = _epath(path).stat().length
    if os.path.exists(target) and os.path.getsize(target) == size:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
    with os.fdopen(fd, "wb") as out, open_file(path, "rb") as f, _named(path):
        shutil.copyfileobj(f, out, 16 << 20)
    os.replace(tmp, target)  # Concurrent readers see no half-written copy.
    return target


def local_folder(path: str) -> str:
    """A local folder with the files of folder `path` (its subfolders are left out): `path`
    itself if local, else copies made with `local_copy`, for readers of local files only
    (safetensors)."""
    if not is_remote(path):
        return path
    files = [join(path, name) for name in listdir(path)]
    copies = [local_copy(file) for file in files if not isdir(file)]
    if not copies:
        raise FileNotFoundError(f"{path}: no files there")
    return os.path.dirname(copies[0])


@contextlib.contextmanager
def staged_folder(path: str) -> Iterator[str]:
    """A local folder to write into that becomes `path`: `path` itself if local; for a URL a
    temporary folder whose files are uploaded to `path` when the block succeeds."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ling-jax-upload-") as staging:
        yield staging
        for name in sorted(os.listdir(staging)):
            source = os.path.join(staging, name)
            if os.path.isdir(source):
                copytree(source, join(path, name))
            else:
                copy(source, join(path, name))
