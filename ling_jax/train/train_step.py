"""The pure training and evaluation steps.

The model is split once into a static graph and two pure (metadata-free) states:

    graphdef, state = init_train_state(model, optimizer)
    step = jit_train_step(make_train_step(graphdef, optimizer, schedule, train_cfg, optim_cfg,
                                          model_cfg))
    state, metrics = step(state, batch)      # `state` is donated: do not touch the old one

One step: split the global batch into `train.micro_batches` micro-batches (strided rows, so that
under data parallelism every device holds part of every micro-batch), `lax.scan` over them
summing gradients, loss sums and routed-token counts, then one AdamW update of the `nnx.Param`s
and one zero-mean sign update of the `ExpertBias`es. Each micro-batch loss is normalised by the
token counts of the whole global batch, so the summed gradient equals the full-batch gradient of
the token-mean loss. Under `jit` with a sharded batch the sums are global (all devices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ling_jax.model.params import ExpertBias
from ling_jax.model.transformer import LingForCausalLM, LingOutput
from ling_jax.parallel.mesh import BATCH_AXES
from ling_jax.parallel.sharding import replicated, use_sharding
from ling_jax.train.bias_update import load_ratio, update_expert_biases
from ling_jax.train.config import validate_optim_config, validate_train_config
from ling_jax.train.finite import keep_if_finite, step_is_finite
from ling_jax.train.loss import Batch, combine_loss, loss_sums, token_counts

BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")

Metrics = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree of arrays (checkpoint it as is).

    step:        [] int32, optimizer steps taken so far.
    params:      the model's pure `nnx.Param` state (nested dict-like `nnx.State` of arrays,
                 stacked layers carry a leading layer axis); the only thing the optimizer sees.
    expert_bias: the pure `ExpertBias` state, fp32: moe_layers/blocks/ffn/router/expert_bias
                 [num_moe_layers, E] and mtp/block/ffn/router/expert_bias [E].
    opt_state:   the optax state of `params`.
    """

    step: jax.Array
    params: nnx.State
    expert_bias: nnx.State
    opt_state: optax.OptState


def init_train_state(
    model: nnx.Module, optimizer: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
    """Splits the model into its static graph and a fresh `TrainState` at step 0.

    The state shares the model's arrays, and the first (donating) step deletes them: use
    `merge_model` afterwards, not the original model. Raises if the model holds variables
    other than `nnx.Param` and `ExpertBias`.
    """
    graphdef, params, expert_bias = nnx.split(model, nnx.Param, ExpertBias)
    params, expert_bias = nnx.as_pure(params), nnx.as_pure(expert_bias)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        expert_bias=expert_bias,
        opt_state=optimizer.init(params),
    )
    return graphdef, state


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> LingForCausalLM:
    """Rebuilds the NNX model from the state (for evaluation, sampling or export)."""
    return nnx.merge(graphdef, state.params, state.expert_bias)


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """[batch, ...] -> [micro_batches, batch // micro_batches, ...]; micro-batch i holds rows
    i, i + micro_batches, i + 2 * micro_batches, ... (strided, to stay spread over devices)."""

    def split(x):
        rows = x.shape[0]
        if rows % micro_batches:
            raise ValueError(
                f"batch of {rows} rows does not split into train.micro_batches={micro_batches}"
            )
        return x.reshape(rows // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)

    return {key: split(value) for key, value in batch.items()}


def _expert_counts(output: LingOutput) -> dict[str, jax.Array | None]:
    return {
        "moe": None if output.moe_stats is None else output.moe_stats.expert_counts,
        "mtp": None if output.mtp_stats is None else output.mtp_stats.expert_counts,
    }


def _forward(graphdef, params, expert_bias, batch: Batch) -> LingOutput:
    model = nnx.merge(graphdef, params, expert_bias)
    return model(batch["input_ids"], batch["positions"], batch["segment_ids"])


def _load_metrics(counts: dict[str, jax.Array | None], first_moe_layer: int) -> Metrics:
    metrics = {}
    if counts["moe"] is not None:
        ratios = load_ratio(counts["moe"])  # [num_moe_layers]
        metrics["moe/max_load_ratio"] = ratios.max()
        metrics["moe/mean_load_ratio"] = ratios.mean()
        for i in range(ratios.shape[0]):
            metrics[f"moe/load_ratio/layer_{first_moe_layer + i}"] = ratios[i]
    if counts["mtp"] is not None:
        metrics["mtp/load_ratio"] = load_ratio(counts["mtp"])
    return metrics


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    train_cfg: ml_collections.ConfigDict,
    optim_cfg: ml_collections.ConfigDict,
    model_cfg: ml_collections.ConfigDict,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Returns the pure `train_step(state, batch) -> (new_state, metrics)` (not yet jitted).

    batch: dict of [train.batch_size, seq] arrays with keys `BATCH_KEYS` (others are ignored).
    metrics (fp32 scalars): loss, ce, mtp_loss, z_loss, accuracy, tokens, grad_norm (before
    clipping), lr (used by this update), moe/max_load_ratio and moe/mean_load_ratio (over
    layers of max(n) / mean(n)), moe/load_ratio/layer_<i> per MoE layer, mtp/load_ratio,
    nonfinite (1.0 if the loss or the gradient norm is NaN/inf). With
    `train.on_nonfinite = "skip"` such a step leaves params, optimizer state and expert biases
    as they were (only `step` advances, as the data does).
    """
    train_cfg = validate_train_config(train_cfg)
    optim_cfg = validate_optim_config(optim_cfg)
    micro_batches = int(train_cfg.micro_batches)
    mtp_weight = (
        model_cfg.mtp.loss_weight
        if train_cfg.mtp_loss_weight is None
        else train_cfg.mtp_loss_weight
    )
    z_loss_weight = float(optim_cfg.z_loss_weight)
    bias_rate = float(optim_cfg.bias_update_rate)
    first_moe_layer = int(model_cfg.first_k_dense_replace)
    skip_nonfinite = train_cfg.on_nonfinite == "skip"

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        batch = {key: jnp.asarray(batch[key]) for key in BATCH_KEYS}
        counts = token_counts(batch)  # Denominators of the whole global batch.

        def micro_step(params, micro_batch):
            def loss_fn(params):
                output = _forward(graphdef, params, state.expert_bias, micro_batch)
                sums = loss_sums(output, micro_batch)
                loss, _ = combine_loss(
                    sums, counts, mtp_weight=mtp_weight, z_loss_weight=z_loss_weight
                )
                return loss, (sums, _expert_counts(output))

            grads, aux = jax.grad(loss_fn, has_aux=True)(params)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            return grads, aux

        if micro_batches == 1:
            grads, (sums, expert_counts) = micro_step(state.params, batch)
        else:
            stacked = split_micro_batches(batch, micro_batches)

            def body(carry, micro_batch):
                out = micro_step(state.params, micro_batch)
                return jax.tree.map(jnp.add, carry, out), None

            first = jax.tree.map(lambda x: x[0], stacked)
            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(micro_step, state.params, first),
            )
            (grads, (sums, expert_counts)), _ = jax.lax.scan(body, zeros, stacked)

        # Accumulated in fp32; the optimizer gets gradients in the parameters' own dtypes.
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # The bias moves by the sign rule only, from the counts of the whole global batch.
        model = nnx.merge(graphdef, params, state.expert_bias)
        update_expert_biases(model, expert_counts, bias_rate)
        expert_bias = nnx.as_pure(nnx.state(model, ExpertBias))

        _, metrics = combine_loss(sums, counts, mtp_weight=mtp_weight, z_loss_weight=z_loss_weight)
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        metrics.update(_load_metrics(expert_counts, first_moe_layer))
        finite = step_is_finite(metrics)
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        if skip_nonfinite:
            params, opt_state, expert_bias = keep_if_finite(
                finite,
                (params, opt_state, expert_bias),
                (state.params, state.opt_state, state.expert_bias),
            )
        new_state = TrainState(
            step=state.step + 1, params=params, expert_bias=expert_bias, opt_state=opt_state
        )
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[TrainState, Batch], Metrics]:
    """Returns the pure `eval_step(state, batch) -> sums` (not yet jitted).

    The sums add up over batches: ce_sum (nats, over `loss_mask`), tokens, correct, mtp_ce_sum,
    mtp_tokens, and target_bytes (sum of `target_bytes * loss_mask`) when the batch has a
    `target_bytes` entry. Mean loss = ce_sum / tokens; bits/byte = ce_sum / ln 2 / target_bytes.
    """

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        target_bytes = batch.get("target_bytes")
        batch = {key: jnp.asarray(batch[key]) for key in BATCH_KEYS}
        output = _forward(graphdef, state.params, state.expert_bias, batch)
        sums = loss_sums(output, batch)
        counts = token_counts(batch)
        metrics = {
            "ce_sum": sums["ce_sum"],
            "tokens": counts["tokens"],
            "correct": sums["correct"],
            "mtp_ce_sum": sums["mtp_ce_sum"],
            "mtp_tokens": counts["mtp_tokens"],
        }
        if target_bytes is not None:
            mask = batch["loss_mask"].astype(jnp.float32)
            metrics["target_bytes"] = (jnp.asarray(target_bytes, jnp.float32) * mask).sum()
        return metrics

    return eval_step


def jit_train_step(
    train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
    compiler_options: dict[str, Any] | None = None,
    *,
    mesh: Mesh | None = None,
    state_shardings: TrainState | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """`jax.jit` with the state (argument 0) donated: its buffers are reused for the new state.

    With a `mesh`, the step is traced under `use_sharding(mesh)` (activation constraints and the
    shard_map MoE), the state keeps `state_shardings`, batches are split over the batch axes
    and metrics are replicated. compiler_options go to XLA, e.g.
    {"xla_backend_optimization_level": 0} compiles the tiny CPU test model about 5x faster.
    """
    if mesh is None:
        return jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options)

    def step_on_mesh(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with use_sharding(mesh):
            return train_step(state, batch)

    return jax.jit(
        step_on_mesh,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options,
    )


def jit_eval_step(
    eval_step: Callable[[TrainState, Batch], Metrics],
    *,
    mesh: Mesh | None = None,
    state_shardings: TrainState | None = None,
) -> Callable[[TrainState, Batch], Metrics]:
    """`jax.jit` of an eval step; with a mesh, as `jit_train_step` lays it out."""
    if mesh is None:
        return jax.jit(eval_step)

    def eval_on_mesh(state: TrainState, batch: Batch) -> Metrics:
        with use_sharding(mesh):
            return eval_step(state, batch)

    return jax.jit(
        eval_on_mesh,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of every batch array split over the mesh's batch axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
