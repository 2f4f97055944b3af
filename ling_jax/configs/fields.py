"""Dotted field access on nested ConfigDicts: `set_fields(cfg, {"moe.num_experts": 64})`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections


def set_fields(cfg: ml_collections.ConfigDict, fields: Mapping[str, Any]) -> None:
    """Sets dotted keys on a nested config in place; a key that does not exist is an error."""
    for key, value in fields.items():
        node = cfg
        *sections, leaf = key.split(".")
        for i, section in enumerate(sections):
            if section not in node or not isinstance(node[section], ml_collections.ConfigDict):
                raise ValueError(
                    f"unknown config field {key!r}: no section {'.'.join(sections[: i + 1])!r}"
                )
            node = node[section]
        if leaf not in node:
            raise ValueError(f"unknown config field {key!r}")
        node[leaf] = value
