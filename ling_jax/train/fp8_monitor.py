"""The FP8 safeguards of a training run: per op and layer, sampled every few steps.

Every `fp8.monitor_every_steps` steps the trainer runs a separate jitted forward and backward
pass of the current parameters on (the first micro-batch of) the current batch inside
`ling_jax.model.fp8.probing()`, with gradient taps (`ling_jax.model.fp8.safeguards`), and
writes, for every FP8 op and each of its tensors (input: the activation, weight, grad: the
output gradient dL/dy that the backward GEMMs quantize),

    fp8/underflow/layer_03/attn_qkv/input     fraction of non-zero elements quantized to zero
    fp8/distortion/layer_03/attn_qkv/grad     cosine(tensor, quantize -> dequantize round trip)

(layers are numbered as in the model, the MTP block is `mtp`; ops: attn_qkv, attn_out,
mlp_{gate,up,down}, shared_{gate,up,down}, experts_{gate_up,down}) with the summaries
fp8/underflow/max and fp8/distortion/min, and logs a warning naming every op whose statistic
crosses `fp8.underflow_warn` or `fp8.distortion_warn`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from ling_jax.model import fp8
from ling_jax.model.fp8 import safeguards
from ling_jax.model.fp8.safeguards import GRAD_TAP_PREFIX, STAT_PREFIX
from ling_jax.train.loss import compute_loss
from ling_jax.train.train_step import BATCH_KEYS

# The module that owns an FP8 op -> the prefix of the op's metric name.
_OWNERS = {"attention": "attn", "shared_expert": "shared", "experts": "experts", "ffn": "mlp"}
_STACKS = ("dense_layers", "moe_layers", "mtp")


def _leaves(tree, path=()):
    """(string path, {"underflow", "distortion"}) for every recorded tensor in `tree`."""
    if isinstance(tree, Mapping):
        if set(tree) == {"underflow", "distortion"}:
            yield path, tree
            return
        for key, value in tree.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _leaves(value, path)


def flatten_records(records, first_moe_layer: int) -> dict[str, jax.Array]:
    """The model's popped `nnx.Intermediate` records -> {metric name: fp32 scalar}."""
    metrics = {}
    for path, stats in _leaves(records):
        stack = path[0]
        if stack not in _STACKS:
            raise ValueError(f"FP8 record outside a known stack: {'/'.join(path)}")
        op_at = max(
            i
            for i, part in enumerate(path)
            if part.startswith(STAT_PREFIX) and part != STAT_PREFIX + "layers"
        )
        owner = _OWNERS[path[op_at - 1]]
        op = f"{owner}_{path[op_at][len(STAT_PREFIX) :]}"
        tensor = path[-1]
        for name, value in stats.items():
            if stack == "mtp":
                metrics[f"fp8/{name}/mtp/{op}/{tensor}"] = value
                continue
            offset = first_moe_layer if stack == "moe_layers" else 0
            for i in range(value.shape[0]):
                metrics[f"fp8/{name}/layer_{offset + i:02d}/{op}/{tensor}"] = value[i]
    return metrics


def _grad_records(tree, path=()):
    """Tap gradients {.., "fp8_grad_<op>": [..., 2]} -> records {.., "fp8_<op>": {"grad": ..}}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = _grad_records(value)
        elif key.startswith(GRAD_TAP_PREFIX):
            stats = {"underflow": value[..., 0], "distortion": value[..., 1]}
            out[STAT_PREFIX + key[len(GRAD_TAP_PREFIX) :]] = {"grad": stats}
    return out


def probe_model(model: nnx.Module, batch: Mapping, mtp_weight: float) -> dict[str, jax.Array]:
    """One forward and backward pass of the training loss (without the z-loss) inside
    `probing()`, with gradient taps; the FP8 statistics by metric name. Modifies `model`."""
    safeguards.add_grad_taps(model)
    graphdef, taps, rest = nnx.split(model, safeguards.GradTap, ...)

    def loss_fn(taps):
        tapped = nnx.merge(graphdef, taps, rest)
        with fp8.probing():
            output, records = nnx.capture(tapped, nnx.Intermediate)(
                batch["input_ids"], batch["positions"], batch["segment_ids"]
            )
        loss, _ = compute_loss(output, batch, mtp_weight=mtp_weight, z_loss_weight=0.0)
        return loss, nnx.to_pure_dict(records)

    tap_grads, records = jax.grad(loss_fn, has_aux=True)(taps)
    first_moe = int(model.config.first_k_dense_replace)
    metrics = flatten_records(records, first_moe)
    metrics.update(flatten_records(_grad_records(nnx.to_pure_dict(tap_grads)), first_moe))
    return metrics


def summarize(metrics: Mapping[str, float]) -> dict[str, float]:
    """fp8/underflow/max and fp8/distortion/min over every op and layer."""
    under = [v for k, v in metrics.items() if k.startswith("fp8/underflow/")]
    cosine = [v for k, v in metrics.items() if k.startswith("fp8/distortion/")]
    return {"fp8/underflow/max": max(under), "fp8/distortion/min": min(cosine)}


def crossings(metrics: Mapping[str, float], fp8_config: ml_collections.ConfigDict) -> list[str]:
    """Human-readable lines for every statistic beyond its warning threshold."""
    lines = []
    for name, value in sorted(metrics.items()):
        if name.endswith(("/max", "/min")):
            continue
        if name.startswith("fp8/underflow/") and value > fp8_config.underflow_warn:
            lines.append(f"{name} = {value:.3g} > fp8.underflow_warn = {fp8_config.underflow_warn}")
        if name.startswith("fp8/distortion/") and value < fp8_config.distortion_warn:
            lines.append(
                f"{name} = {value:.5f} < fp8.distortion_warn = {fp8_config.distortion_warn}"
            )
    return lines


class Fp8Monitor:
    """Samples the safeguards; `monitor(step, state, batch)` returns {} when not due."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        model_config: ml_collections.ConfigDict,
        micro_batches: int = 1,
        mtp_weight: float | None = None,
    ):
        self.config = model_config.fp8 if "fp8" in model_config else None
        self.every = int(self.config.monitor_every_steps) if fp8.enabled(model_config) else 0
        if mtp_weight is None:
            mtp_weight = model_config.mtp.loss_weight

        def probe(state, batch: dict) -> dict[str, jax.Array]:
            model = nnx.merge(graphdef, state.params, state.expert_bias)
            rows = {k: batch[k][::micro_batches] for k in BATCH_KEYS}  # One micro-batch.
            return probe_model(model, rows, mtp_weight)

        self._probe: Callable = jax.jit(probe)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, step: int, state, batch: dict) -> dict[str, float]:
        if not self.due(step):
            return {}
        metrics = {
            k: float(np.asarray(v)) for k, v in jax.device_get(self._probe(state, batch)).items()
        }
        metrics.update(summarize(metrics))
        for line in crossings(metrics, self.config):
            logging.warning("FP8 safeguard at step %d: %s", step, line)
        return metrics
