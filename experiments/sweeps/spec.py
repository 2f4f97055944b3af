"""What a sweep is: named points, each an `experiments.run` config file plus overrides.

    sweep = Sweep.grid("lr", "experiments/configs/quickstart.py",
                       {"optim.peak_lr": [1e-3, 3e-3], "seed": [0, 1]})
    sweep.points[0].command("runs/lr")   # the experiments.run command of one point

A point is exactly what `python -m experiments.run` takes: `--config=FILE[:ARG]` and
`--config.FIELD=VALUE` overrides, so every point can be run here, in a notebook, or on a TPU pod
by the same command. `tags` are the point's descriptive columns in the results table (compute,
model size, the axis values of a grid).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import itertools
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from ling_jax.configs import set_fields
from ling_jax.io import paths
from ling_jax.train.experiment import validate_experiment_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,=+-]*$")


def render_value(value: Any) -> str:
    """A config value as `--config.FIELD=VALUE` spells it (ml_collections' flag parsing)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    raise TypeError(f"cannot put {value!r} ({type(value).__name__}) on a command line")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `FILE[:ARG]` as `--config=FILE[:ARG]` does: `get_config(ARG)` or `get_config()`."""
    module = load_module(spec.split(":", 1)[0])
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {module.__file__} has no get_config()")
    return module.get_config(spec.split(":", 1)[1]) if ":" in spec else module.get_config()


def load_module(path: str) -> Any:
    """Imports a Python file by path (relative paths from the repository root or the cwd)."""
    candidates = [path, os.path.join(REPO, path)]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise FileNotFoundError(f"config file {path!r} not found (also looked in {REPO})")
    name = "sweep_config_" + re.sub(r"\W", "_", os.path.abspath(found))
    module_spec = importlib.util.spec_from_file_location(name, found)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep.

    Attributes:
      name: unique within the sweep; the run's workdir is `<root>/<name>`.
      config: `FILE[:ARG]`, as given to `experiments.run --config=`.
      overrides: dotted config fields set on top (`{"optim.peak_lr": 1e-3}`).
      tags: descriptive values for the results table (not passed to the run).
    """

    name: str
    config: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tags: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(
                f"point name {self.name!r} is invalid: use letters, digits and _.,=+- "
                "(it names a folder)"
            )
        for value in self.overrides.values():
            render_value(value)

    def args(self, workdir: str) -> list[str]:
        """`experiments.run` arguments (after `python -m`)."""
        args = ["experiments.run", f"--config={self.config}", f"--workdir={workdir}"]
        args += [f"--config.{k}={render_value(v)}" for k, v in self.overrides.items()]
        return args

    def command(self, root: str, python: str = "python") -> str:
        """The shell command that trains this point into `<root>/<name>`."""
        args = self.args(paths.join(root, self.name))
        return " ".join([python, "-m", *map(shlex.quote, args)])

    def experiment_config(self) -> ml_collections.ConfigDict:
        """The validated config this point trains with (file, then overrides)."""
        cfg = load_config_file(self.config)
        try:
            set_fields(cfg, self.overrides)
            return validate_experiment_config(cfg)
        except ValueError as e:
            raise ValueError(f"sweep point {self.name!r}: {e}") from e

    @functools.cached_property
    def num_steps(self) -> int:
        """Training steps of the point's config, loaded and validated once per `Point`."""
        return int(self.experiment_config().train.num_steps)

    def definition(self) -> dict[str, Any]:
        """What identifies the run (for the resumability check): config and overrides."""
        return {
            "config": self.config,
            "overrides": {k: render_value(v) for k, v in self.overrides.items()},
        }


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A named list of points (unique names)."""

    name: str
    points: tuple[Point, ...]

    def __post_init__(self):
        object.__setattr__(self, "points", tuple(self.points))
        if not self.points:
            raise ValueError(f"sweep {self.name!r} has no points")
        names = [p.name for p in self.points]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"sweep {self.name!r}: duplicate point names {duplicates}")

    def num_steps(self) -> dict[str, int]:
        """Each point's training steps; loads and validates every config (once per `Point`)."""
        return {p.name: p.num_steps for p in self.points}

    @classmethod
    def grid(
        cls,
        name: str,
        config: str,
        axes: Mapping[str, Sequence[Any]],
        *,
        base_overrides: Mapping[str, Any] | None = None,
    ) -> Sweep:
        """The Cartesian product of `axes` (dotted field -> values) on one config file.

        Point names join `<last field part>=<value>`; each axis value is also a tag.
        """
        if not axes or any(len(v) == 0 for v in axes.values()):
            raise ValueError(f"sweep {name!r}: every axis needs at least one value, got {axes!r}")
        points = []
        for values in itertools.product(*axes.values()):
            chosen = dict(zip(axes, values, strict=True))
            label = ",".join(f"{k.split('.')[-1]}={render_value(v)}" for k, v in chosen.items())
            points.append(
                Point(
                    name=label,
                    config=config,
                    overrides={**(base_overrides or {}), **chosen},
                    tags=chosen,
                )
            )
        return cls(name, tuple(points))

    def point(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise ValueError(
            f"sweep {self.name!r} has no point {name!r}: {[p.name for p in self.points]}"
        )

    def with_overrides(self, overrides: Mapping[str, Any]) -> Sweep:
        """The same sweep with `overrides` added to every point (e.g. the data location)."""
        return Sweep(
            self.name,
            tuple(
                dataclasses.replace(p, overrides={**p.overrides, **overrides}) for p in self.points
            ),
        )

    def select(self, names: Sequence[str]) -> Sweep:
        """The sub-sweep of the named points, in the sweep's order."""
        wanted = set(names)
        unknown = wanted - {p.name for p in self.points}
        if unknown:
            raise ValueError(f"sweep {self.name!r} has no point(s) {sorted(unknown)}")
        return Sweep(self.name, tuple(p for p in self.points if p.name in wanted))


def parse_assignment(text: str) -> tuple[str, Any]:
    """`FIELD=VALUE` -> (field, value): Python literals (numbers, True, tuples) or else a string."""
    field, sep, raw = text.partition("=")
    if not sep or not field:
        raise ValueError(f"{text!r} is not FIELD=VALUE")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return field, value


def load_sweep(spec: str) -> Sweep:
    """`FILE[:ARG]` of a sweep config: a Python file whose `get_sweep([ARG])` returns a Sweep."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"sweep config {path!r} defines no get_sweep()")
    sweep = module.get_sweep(arg) if arg else module.get_sweep()
    if not isinstance(sweep, Sweep):
        raise ValueError(f"{path}: get_sweep() returned {type(sweep).__name__}, expected a Sweep")
    return sweep
