"""The pre-norm decoder block and the stacked (scanned) runs of identical blocks."""

from __future__ import annotations

import jax
from flax import nnx

from ling_jax.model.attention import Attention
from ling_jax.model.fp8 import safeguards
from ling_jax.model.mlp import SwiGLU
from ling_jax.model.moe.layer import MoE, MoEStats
from ling_jax.model.norms import RMSNorm
from ling_jax.model.params import LAYERS_AXIS


class DecoderBlock(nnx.Module):
    """h + Attn(norm(h)), then + FFN(norm(.)); FFN is a dense SwiGLU or the MoE layer."""

    def __init__(self, config, *, use_moe: bool, rngs: nnx.Rngs):
        self.use_moe = use_moe
        self.input_norm = RMSNorm(config.hidden_size, config)
        self.attention = Attention(config, rngs=rngs)
        self.post_attention_norm = RMSNorm(config.hidden_size, config)
        if use_moe:
            self.ffn = MoE(config, rngs=rngs)
        else:
            self.ffn = SwiGLU(config.hidden_size, config.intermediate_size, config, rngs=rngs)

    def __call__(self, h, rope, mask, token_mask) -> tuple[jax.Array, MoEStats | None]:
        # h: [batch, seq, embed]
        h = h + self.attention(self.input_norm(h), rope, mask)
        if self.use_moe:
            ffn_out, stats = self.ffn(self.post_attention_norm(h), token_mask)
        else:
            ffn_out, stats = self.ffn(self.post_attention_norm(h)), None
        return h + ffn_out, stats


def _remat_policy(name: str):
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


class BlockStack(nnx.Module):
    """`num_layers` identical blocks whose parameters carry a leading "layers" axis.

    With `config.scan_layers` the stack runs under `jax.lax.scan` (compile time independent of
    depth); otherwise it is unrolled over the same stacked parameters, so both paths share one
    parameter layout and can be compared directly.
    """

    def __init__(self, config, num_layers: int, *, use_moe: bool, rngs: nnx.Rngs):
        self.num_layers = num_layers
        self.scan_layers = config.scan_layers
        self.remat = config.remat

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
        def make_blocks(rngs: nnx.Rngs) -> DecoderBlock:
            return DecoderBlock(config, use_moe=use_moe, rngs=rngs)

        self.blocks = make_blocks(rngs)

    def __call__(self, h, rope, mask, token_mask) -> tuple[jax.Array, MoEStats | None]:
        # The blocks are read-only in the forward pass, so the stack is split once into its
        # static graph and stacked state, and each layer is rebuilt from its slice. Plain
        # `jax.lax.scan` (rather than `nnx.scan`) keeps this valid under any outer transform,
        # e.g. `jax.grad` of a function that merges the model from traced parameters.
        graphdef, state = nnx.split(self.blocks)

        def apply_layer(h, layer_state):
            layer = nnx.merge(graphdef, layer_state)
            # FP8 safeguard records leave the scan as per-layer outputs ({} unless probing).
            (h, stats), records = safeguards.call_recording(layer, h, rope, mask, token_mask)
            return h, (stats, records)

        if self.remat != "none":
            apply_layer = jax.checkpoint(apply_layer, policy=_remat_policy(self.remat))

        if self.scan_layers:
            h, (stats, records) = jax.lax.scan(apply_layer, h, state)
        else:
            per_layer = []
            for i in range(self.num_layers):
                h, out = apply_layer(h, jax.tree.map(lambda a, i=i: a[i], state))
                per_layer.append(out)
            stats, records = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *per_layer)
        if records:  # [num_layers, ...] each
            self.sow(nnx.Intermediate, safeguards.STAT_PREFIX + "layers", records)
        return h, stats
