"""Wind-tunnel ladders: planned runs at spaced compute budgets, as experiment configs (SPEC 7.3).

A ladder is a list of `ling_jax.scaling.Plan`s, smallest compute first: each rung's shape
follows the MoE law (activation ratio, granularity), its tokens the compute-optimal allocation
and its LR and batch eta_opt(C) and B_opt(C). `Ladder.experiment_config(rung)` turns a rung
into the config `experiments.run` trains, and `Ladder.sweep(config_file)` into a sweep whose
points are `--config=<config_file>:<rung>`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from experiments.sweeps.spec import Point, Sweep
from ling_jax.configs import set_fields
from ling_jax.scaling.planner import Plan
from ling_jax.train.experiment import default_experiment_config, validate_experiment_config


def plan_tags(plan: Plan, lr_scale: float = 1.0) -> dict[str, Any]:
    """The results-table columns that describe a plan (learning_rate: the peak LR used)."""
    cfg = plan.config
    return {
        "arch": plan.arch,
        "compute": plan.realized_compute,
        "flops_per_token": plan.flops_per_token,
        "tokens": plan.tokens,
        "params": plan.params.total,
        "active_params": plan.params.active,
        "d_model": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "activation_ratio": plan.activation_ratio,
        "granularity": plan.granularity if plan.granularity is not None else math.nan,
        "learning_rate": lr_scale * plan.learning_rate,
        "batch_size": plan.batch_size,
        "predicted_el": plan.efficiency_leverage,
    }


def experiment_config_from_plan(
    plan: Plan,
    *,
    lr_scale: float = 1.0,
    warmup_fraction: float = 0.01,
    overrides: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> ml_collections.ConfigDict:
    """An experiment config training `plan`: its model, batch, steps and LR.

    The schedule is the paper's ladder protocol (SPEC 7.2): warmup, constant, then an
    exponential decay to 10% of the peak over the last 10% of the steps, so the final
    validation loss is that of an annealed model. `overrides` (dotted fields) are set last;
    `validate=False` leaves fields the user must still set (e.g. data.train_files) unchecked.
    """
    if not lr_scale > 0:
        raise ValueError(f"lr_scale = {lr_scale!r}: expected > 0")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"warmup_fraction = {warmup_fraction!r}: expected [0, 1)")
    cfg = default_experiment_config(plan.config)
    cfg.data.seq_len = plan.seq_len
    cfg.train.batch_size = plan.batch_size
    cfg.train.num_steps = plan.train_steps
    cfg.optim.peak_lr = lr_scale * plan.learning_rate
    cfg.schedule.type = "wsd"
    cfg.schedule.total_steps = plan.train_steps
    cfg.schedule.warmup_steps = max(1, math.ceil(warmup_fraction * plan.train_steps))
    cfg.schedule.decay_fraction = 0.1
    cfg.schedule.decay_shape = "exponential"
    cfg.schedule.final_lr_fraction = 0.1
    cfg.eval.every_steps = plan.train_steps
    cfg.checkpoint.every_steps = plan.train_steps
    set_fields(cfg, overrides or {})
    return validate_experiment_config(cfg) if validate else cfg


@dataclasses.dataclass(frozen=True)
class Ladder:
    """Planned rungs, smallest compute first, and how each becomes an experiment config.

    Attributes:
      plans: rung name -> Plan.
      lr_scale: peak LR = lr_scale x eta_opt(C) at every rung.
      warmup_fraction: warmup steps as a fraction of each run.
      overrides: dotted experiment-config fields set on every rung (data, eval, logging...).
      seeds: every rung is trained once per seed (initialisation and data order both follow
        it); seed 0 is the config's own run `<rung>`, seed s > 0 the point `<rung>_seed<s>`.
        The fit then averages over seeds at each compute.
    """

    plans: Mapping[str, Plan]
    lr_scale: float = 1.0
    warmup_fraction: float = 0.01
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"ladder seeds {self.seeds!r}: expected distinct ints, at least one")
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds):
            raise ValueError(f"ladder seeds {self.seeds!r}: expected ints >= 0")
        computes = [p.realized_compute for p in self.plans.values()]
        if not computes or computes != sorted(computes):
            raise ValueError(
                f"a ladder's rungs must be ordered by compute, got "
                f"{ {n: f'{p.realized_compute:.3g}' for n, p in self.plans.items()} }"
            )

    @property
    def names(self) -> list[str]:
        return list(self.plans)

    def plan(self, rung: str) -> Plan:
        if rung not in self.plans:
            raise ValueError(f"unknown ladder rung {rung!r}: expected one of {self.names}")
        return self.plans[rung]

    def experiment_config(self, rung: str, validate: bool = True) -> ml_collections.ConfigDict:
        return experiment_config_from_plan(
            self.plan(rung),
            lr_scale=self.lr_scale,
            warmup_fraction=self.warmup_fraction,
            overrides=self.overrides,
            validate=validate,
        )

    def sweep(self, name: str, config_file: str, prefix: str = "") -> Sweep:
        """Points `<prefix><rung>[_seed<s>]` running `--config=<config_file>:<rung>` (with
        `seed` and `data.shuffle_seed` set to s > 0), tagged by plan and seed."""
        return Sweep(
            name,
            tuple(
                Point(
                    name=f"{prefix}{rung}" + (f"_seed{seed}" if seed else ""),
                    config=f"{config_file}:{rung}",
                    overrides={"seed": seed, "data.shuffle_seed": seed} if seed else {},
                    tags={"rung": rung, "seed": seed, **plan_tags(plan, self.lr_scale)},
                )
                for rung, plan in self.plans.items()
                for seed in self.seeds
            ),
        )
