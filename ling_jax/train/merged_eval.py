"""Periodic WSM evaluation during training: the merge of the latest snapshots, as a metric.

With `eval.merged_every_steps = K` the trainer evaluates, every K steps, the weights of the last
`eval.merged_num_snapshots` snapshots (those at multiples of `eval.merged_spacing`, by default
every snapshot) merged with the weights of `eval.merged_decay_shape`, and logs the results next
to the other metrics as eval/merged_loss, eval/merged_bits_per_byte, ... The merge is read from
disk by the streaming merge of `ling_jax.train.merge`, so the cost is one snapshot's weights
plus the running sum (each host only its shards, given the run's state shardings) and one
evaluation.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging

from ling_jax.train.merge import cast_like, merge_snapshots, model_fields, snapshot_steps
from ling_jax.train.train_step import TrainState
from ling_jax.train.wsm import decay_curve, merge_weights


def validate_merged_eval_config(cfg: ml_collections.ConfigDict) -> None:
    """Checks `eval.merged_*` against the checkpoint cadence and retention (experiment config)."""
    ev, ck = cfg.eval, cfg.checkpoint
    if ev.merged_every_steps < 0:
        raise ValueError(f"eval.merged_every_steps = {ev.merged_every_steps}: expected >= 0")
    decay_curve(ev.merged_decay_shape)  # Raises on an unknown shape.
    if not ev.merged_every_steps:
        return
    if ev.merged_num_snapshots < 1:
        raise ValueError(f"eval.merged_num_snapshots = {ev.merged_num_snapshots}: expected >= 1")
    spacing = ev.merged_spacing or ck.every_steps
    if spacing % ck.every_steps:
        raise ValueError(
            f"eval.merged_spacing = {ev.merged_spacing}: expected a multiple of "
            f"checkpoint.every_steps = {ck.every_steps}"
        )
    if ev.merged_every_steps % spacing:
        raise ValueError(
            f"eval.merged_every_steps = {ev.merged_every_steps}: expected a multiple of the "
            f"snapshot spacing {spacing} so that the latest merged snapshot is the current step"
        )
    window = (ev.merged_num_snapshots - 1) * spacing
    kept = (ck.max_to_keep - 1) * ck.every_steps
    if ck.max_to_keep and window > kept and not (ck.keep_period and spacing % ck.keep_period == 0):
        raise ValueError(
            f"checkpoint.max_to_keep = {ck.max_to_keep} drops snapshots that "
            f"eval.merged_num_snapshots = {ev.merged_num_snapshots} (spacing {spacing}) merges: "
            f"keep at least {window // ck.every_steps + 1}, set checkpoint.keep_period to a "
            "divisor of the spacing, or 0 to keep all"
        )


class MergedEvaluation:
    """Builds the train state whose weights are the WSM merge of the latest snapshots."""

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str, checkpointer, state_shardings
    ):
        """state_shardings: the `TrainState` of shardings the run's state lives in (the merged
        weights are placed the same way), or one sharding for every array."""
        self._cfg = config.eval
        self._spacing = config.eval.merged_spacing or config.checkpoint.every_steps
        self._workdir, self._checkpointer = workdir, checkpointer
        if isinstance(state_shardings, TrainState):
            state_shardings = {
                "params": state_shardings.params,
                "expert_bias": state_shardings.expert_bias,
            }
        self._shardings = state_shardings
        self._fields = model_fields(config)
        self._weights = merge_weights(
            config.eval.merged_num_snapshots, config.eval.merged_decay_shape
        )

    def due(self, step: int) -> bool:
        return bool(self._cfg.merged_every_steps) and step % self._cfg.merged_every_steps == 0

    def merged_state(self, step: int, state: TrainState) -> TrainState | None:
        """`state` with merged weights; None while fewer than N snapshots exist."""
        self._checkpointer.wait()  # The current step's snapshot must be on disk.
        n = self._cfg.merged_num_snapshots
        candidates = [s for s in snapshot_steps(self._workdir) if s <= step]
        candidates = [s for s in candidates if s % self._spacing == 0][-n:]
        if len(candidates) < n:
            logging.info("Merged eval at step %d: %d of %d snapshots yet", step, len(candidates), n)
            return None
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
            {"params": state.params, "expert_bias": state.expert_bias},
        )
        if isinstance(self._shardings, dict):  # The run's layout: each host reads its shards.
            merged = merge_snapshots(
                self._workdir,
                candidates,
                self._weights,
                target,
                self._fields,
                shardings=self._shardings,
            )
            merged = jax.tree.map(lambda x, t: x.astype(t.dtype), merged, target)
        else:
            merged = merge_snapshots(self._workdir, candidates, self._weights, target, self._fields)
            merged = jax.device_put(cast_like(merged, target), self._shardings)
        return state.replace(params=merged["params"], expert_bias=merged["expert_bias"])
