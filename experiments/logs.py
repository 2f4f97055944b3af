"""Console logging shared by the experiment commands."""

from __future__ import annotations

import logging as py_logging

from absl import logging


class _QuietLibraries(py_logging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
