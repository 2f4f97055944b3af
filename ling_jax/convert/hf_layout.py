"""The HF BailingMoeV2 tensor layout (SPEC section 3) and its map onto the NNX model state.

One `LeafLayout` per leaf of `nnx.state(LingForCausalLM(config))` lists the HF tensors that make
it up. Stacked layers hold one HF tensor per layer (routed experts: per layer and expert) at
`index` into the leaf's leading axes. Our linears are [in..., out...]; HF linears are
[out, in], so a leaf with `in_axes = n` is flattened to [prod(in), prod(out)] and transposed:

  attention.qkv [d, n_h + 2 n_kv, head_dim] -> query_key_value [(n_h + 2 n_kv) * head_dim, d]
  attention.out [n_h, head_dim, d]          -> dense [d, n_h * head_dim]
  mtp.eh_proj   [2d, d]                     -> eh_proj [d, 2d] (embedding half first)

The two generators below convert in both directions one HF tensor at a time, so that a
checkpoint is never held twice in host memory; they work on any state with the model's paths
(an `nnx.State`, or a nested dict of arrays such as a restored training checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """How one state leaf is stored in the HF checkpoint.

    Attributes:
      path: the leaf's path in the NNX state; None for an HF tensor the model does not hold
        (the zero expert bias the HF model keeps when `moe.use_expert_bias` is off).
      shape: the leaf's full shape, leading layer / expert axes included.
      in_axes: 0 for tensors stored as they are (norms, embedding, expert bias); n > 0 for a
        linear whose first n axes (after the index axes) are its input.
      fp32: stored as float32 whatever the requested dtype (the expert bias).
      tensors: (index into the leading axes, HF name) per HF tensor.
    """

    path: Path | None
    shape: tuple[int, ...]
    in_axes: int
    fp32: bool
    tensors: tuple[tuple[tuple[int, ...], str], ...]

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return self.shape[len(self.tensors[0][0]) :]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        s = self.slice_shape
        if not self.in_axes:
            return s
        return (math.prod(s[self.in_axes :]), math.prod(s[: self.in_axes]))

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Our slice [in..., out...] -> the HF tensor (a view where possible)."""
        if not self.in_axes:
            return x
        return x.reshape(math.prod(x.shape[: self.in_axes]), -1).T

    def from_hf(self, t: np.ndarray) -> np.ndarray:
        """The HF tensor -> our slice."""
        if not self.in_axes:
            return t.reshape(self.slice_shape)
        return t.T.reshape(self.slice_shape)


class _BlockLeaves:
    """Collects the leaves of one decoder block, stacked over `hf_layers` or single."""

    def __init__(self, base: Path, hf_layers: Sequence[int] | int, leaves: list[LeafLayout]):
        self.base, self.hf_layers, self.leaves = base, hf_layers, leaves

    def add(self, sub: str, shape, hf_suffix: str, in_axes: int = 0, *, fp32=False, experts=0):
        """`hf_suffix` may hold `{e}`, the expert index, when `experts` > 0."""
        stacked = not isinstance(self.hf_layers, int)
        layers = list(enumerate(self.hf_layers)) if stacked else [(None, self.hf_layers)]
        tensors = []
        for i, layer in layers:
            for e in range(experts) if experts else [None]:
                index = tuple(j for j in (i, e) if j is not None)
                name = f"model.layers.{layer}.{hf_suffix.format(e=e)}"
                tensors.append((index, name))
        full_shape = ((len(layers),) if stacked else ()) + ((experts,) if experts else ())
        path = None if sub is None else self.base + tuple(sub.split("."))
        self.leaves.append(
            LeafLayout(path, full_shape + tuple(shape), in_axes, fp32, tuple(tensors))
        )


def _block(cfg, block: _BlockLeaves, use_moe: bool) -> None:
    d, hd, n_h = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    block.add("input_norm.scale", (d,), "input_layernorm.weight")
    block.add(
        "attention.qkv",
        (d, n_h + 2 * cfg.num_kv_heads, hd),
        "attention.query_key_value.weight",
        in_axes=1,
    )
    if cfg.attention.use_qk_norm:
        block.add("attention.q_norm.scale", (hd,), "attention.query_layernorm.weight")
        block.add("attention.k_norm.scale", (hd,), "attention.key_layernorm.weight")
    block.add("attention.out", (n_h, hd, d), "attention.dense.weight", in_axes=2)
    block.add("post_attention_norm.scale", (d,), "post_attention_layernorm.weight")
    if not use_moe:
        f = cfg.intermediate_size
        block.add("ffn.gate", (d, f), "mlp.gate_proj.weight", 1)
        block.add("ffn.up", (d, f), "mlp.up_proj.weight", 1)
        block.add("ffn.down", (f, d), "mlp.down_proj.weight", 1)
        return
    moe = cfg.moe
    n_e, d_e = moe.num_experts, moe.expert_intermediate_size
    block.add("ffn.router.kernel", (d, n_e), "mlp.gate.weight", 1)
    # Without the bias the HF model still keeps a zero buffer: written and checked as zeros.
    bias_leaf = "ffn.router.expert_bias" if moe.use_expert_bias else None
    block.add(bias_leaf, (n_e,), "mlp.gate.expert_bias", fp32=True)
    block.add("ffn.experts.gate", (d, d_e), "mlp.experts.{e}.gate_proj.weight", 1, experts=n_e)
    block.add("ffn.experts.up", (d, d_e), "mlp.experts.{e}.up_proj.weight", 1, experts=n_e)
    block.add("ffn.experts.down", (d_e, d), "mlp.experts.{e}.down_proj.weight", 1, experts=n_e)
    if moe.num_shared_experts:
        s = moe.num_shared_experts * moe.shared_expert_intermediate_size
        block.add("ffn.shared_expert.gate", (d, s), "mlp.shared_experts.gate_proj.weight", 1)
        block.add("ffn.shared_expert.up", (d, s), "mlp.shared_experts.up_proj.weight", 1)
        block.add("ffn.shared_expert.down", (s, d), "mlp.shared_experts.down_proj.weight", 1)


def hf_layout(config: ml_collections.ConfigDict) -> list[LeafLayout]:
    """Every state leaf of `LingForCausalLM(config)` with its HF tensors, in checkpoint order."""
    d, vocab = config.hidden_size, config.vocab_size
    num_layers, k = config.num_layers, config.first_k_dense_replace
    leaves = [LeafLayout(("embed",), (vocab, d), 0, False, (((), "model.word_embeddings.weight"),))]
    if k:
        _block(config, _BlockLeaves(("dense_layers", "blocks"), range(k), leaves), use_moe=False)
    if num_layers > k:
        moe_layers = range(k, num_layers)
        _block(config, _BlockLeaves(("moe_layers", "blocks"), moe_layers, leaves), use_moe=True)
    leaves.append(LeafLayout(("final_norm", "scale"), (d,), 0, False, (((), "model.norm.weight"),)))
    leaves.append(LeafLayout(("lm_head",), (d, vocab), 1, False, (((), "lm_head.weight"),)))
    if config.mtp.num_layers:
        # The MTP layer is stored as one more decoder layer, index num_layers.
        mtp = _BlockLeaves(("mtp",), num_layers, leaves)
        mtp.add("embed_norm.scale", (d,), "enorm.weight")
        mtp.add("hidden_norm.scale", (d,), "hnorm.weight")
        mtp.add("eh_proj", (2 * d, d), "eh_proj.weight", in_axes=1)
        _block(config, _BlockLeaves(("mtp", "block"), num_layers, leaves), use_moe=True)
        mtp.add("final_norm.scale", (d,), "final_layernorm.weight")
    return leaves


def hf_tensor_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a checkpoint of `config` holds."""
    return {name: leaf.hf_shape for leaf in hf_layout(config) for _, name in leaf.tensors}


def _flat_values(state: Any) -> dict[Path, Any]:
    """path -> array of an `nnx.State` or nested mapping; nnx.Variables are unwrapped."""
    flat: dict[Path, Any] = {}

    def visit(node: Any, path: Path) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                visit(child, path + (str(key),))
        else:
            flat[path] = node.get_value() if isinstance(node, nnx.Variable) else node

    visit(state, ())
    return flat


def _check_paths(layout: list[LeafLayout], paths: set[Path]) -> None:
    expected = {leaf.path for leaf in layout if leaf.path is not None}
    if paths != expected:
        raise ValueError(
            "state and model config disagree: state has unexpected leaves "
            f"{sorted(paths - expected)} and lacks {sorted(expected - paths)}"
        )


def _out_dtype(leaf: LeafLayout, value_dtype: Any, dtype: Any) -> np.dtype:
    if leaf.fp32:
        return np.dtype(np.float32)
    return jnp.dtype(dtype) if dtype is not None else jnp.dtype(value_dtype)


def hf_tensor_specs(
    state: Any, config: ml_collections.ConfigDict, dtype: Any = None
) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of each tensor `hf_tensors_from_state` yields, in the same order."""
    layout = hf_layout(config)
    values = _flat_values(state)
    _check_paths(layout, set(values))
    specs = []
    for leaf in layout:
        value_dtype = np.float32 if leaf.path is None else values[leaf.path].dtype
        out = _out_dtype(leaf, value_dtype, dtype)
        specs += [(name, leaf.hf_shape, out) for _, name in leaf.tensors]
    return specs


def hf_tensors_from_state(
    state: Any, config: ml_collections.ConfigDict, dtype: Any = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, C-contiguous numpy tensor) for every tensor of the checkpoint.

    Each leaf is fetched to the host once; host memory holds that leaf and one HF tensor.
    `dtype` (e.g. "bfloat16") casts every tensor but the expert bias, which stays float32;
    None keeps each leaf's dtype.
    """
    layout = hf_layout(config)
    values = _flat_values(state)
    _check_paths(layout, set(values))
    for leaf in layout:
        if leaf.path is None:
            for _, name in leaf.tensors:
                yield name, np.zeros(leaf.hf_shape, np.float32)
            continue
        host = np.asarray(jax.device_get(values[leaf.path]))
        if host.shape != leaf.shape:
            raise ValueError(
                f"state leaf {'.'.join(leaf.path)} has shape {host.shape}, "
                f"expected {leaf.shape} for this config"
            )
        out = _out_dtype(leaf, host.dtype, dtype)
        for index, name in leaf.tensors:
            yield name, np.ascontiguousarray(leaf.to_hf(host[index]).astype(out, copy=False))
        del host


def state_from_hf_tensors(
    get_tensor: Callable[[str], np.ndarray],
    config: ml_collections.ConfigDict,
    abstract_state: nnx.State,
    put: Callable[[Path, np.ndarray], jax.Array] | None = None,
) -> nnx.State:
    """Fills `abstract_state` (from `nnx.split(nnx.eval_shape(...))`) from HF tensors.

    `get_tensor(name)` returns one HF tensor as numpy. Each leaf is allocated once in host memory
    in the abstract leaf's dtype, filled tensor by tensor (one per layer / expert), then handed to
    `put(path, array)` (default `jnp.asarray`; pass a sharded `jax.device_put` to place it) and
    released. Raises ValueError naming a tensor whose shape does not match the config, or an
    expert bias that is not zero when the config has none.
    """
    layout = hf_layout(config)
    flat = list(nnx.to_flat_state(abstract_state))
    _check_paths(layout, {tuple(str(k) for k in path) for path, _ in flat})
    by_path = {leaf.path: leaf for leaf in layout}

    def fetch(leaf: LeafLayout, name: str) -> np.ndarray:
        tensor = get_tensor(name)
        if tuple(tensor.shape) != leaf.hf_shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {leaf.hf_shape}"
            )
        return tensor

    for leaf in (lf for lf in layout if lf.path is None):
        for _, name in leaf.tensors:
            if np.any(fetch(leaf, name)):
                raise ValueError(f"tensor {name!r} is not zero, but moe.use_expert_bias is False")

    filled = []
    for path, variable in flat:
        path = tuple(str(k) for k in path)
        leaf = by_path[path]
        abstract = variable.get_value()
        if tuple(abstract.shape) != leaf.shape:
            raise ValueError(
                f"state leaf {'.'.join(path)} has shape {abstract.shape}, "
                f"expected {leaf.shape} for this config"
            )
        host = np.empty(leaf.shape, abstract.dtype)
        for index, name in leaf.tensors:
            host[index] = leaf.from_hf(fetch(leaf, name)).astype(host.dtype, copy=False)
        value = put(path, host) if put is not None else jnp.asarray(host)
        del host
        filled.append((path, variable.replace(value=value)))
    return nnx.from_flat_state(filled)
