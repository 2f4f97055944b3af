"""The full model against the float64 numpy reference, plus structural properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ling_jax.model import LingForCausalLM
from ling_jax.model.params import ExpertBias
from tests.model import numpy_reference
from tests.model.conftest import tiny_config


def _np(x):
    return np.asarray(x, np.float64)


def _block_params(blocks, i=None):
    """Flattens one block's NNX state into the reference's dict (layer i of a stack)."""
    pick = (lambda v: _np(v[...])) if i is None else (lambda v: _np(v[...][i]))
    attn = blocks.attention
    p = {
        "input_norm": pick(blocks.input_norm.scale),
        "post_attention_norm": pick(blocks.post_attention_norm.scale),
        "qkv": pick(attn.qkv),
        "q_norm": pick(attn.q_norm.scale),
        "k_norm": pick(attn.k_norm.scale),
        "out": pick(attn.out),
    }
    ffn = blocks.ffn
    if hasattr(ffn, "router"):
        p.update(
            router=pick(ffn.router.kernel),
            expert_bias=pick(ffn.router.expert_bias),
            experts_gate=pick(ffn.experts.gate),
            experts_up=pick(ffn.experts.up),
            experts_down=pick(ffn.experts.down),
            shared_gate=pick(ffn.shared_expert.gate),
            shared_up=pick(ffn.shared_expert.up),
            shared_down=pick(ffn.shared_expert.down),
        )
    else:
        p.update(gate=pick(ffn.gate), up=pick(ffn.up), down=pick(ffn.down))
    return p


def reference_params(model: LingForCausalLM):
    cfg = model.config
    k = cfg.first_k_dense_replace
    layers = [_block_params(model.dense_layers.blocks, i) for i in range(k)]
    layers += [_block_params(model.moe_layers.blocks, i) for i in range(cfg.num_layers - k)]
    params = {
        "embed": _np(model.embed[...]),
        "lm_head": _np(model.lm_head[...]),
        "final_norm": _np(model.final_norm.scale[...]),
        "layers": layers,
    }
    if model.mtp is not None:
        params["mtp"] = {
            "embed_norm": _np(model.mtp.embed_norm.scale[...]),
            "hidden_norm": _np(model.mtp.hidden_norm.scale[...]),
            "eh_proj": _np(model.mtp.eh_proj[...]),
            "final_norm": _np(model.mtp.final_norm.scale[...]),
            "block": _block_params(model.mtp.block),
        }
    return params


@pytest.fixture(scope="module")
def jitted_forward():
    return nnx.jit(lambda m, ids, pos, seg: m(ids, pos, seg))


def test_forward_matches_numpy_reference(tiny_model, packed_batch, jitted_forward):
    input_ids, positions, segment_ids = packed_batch
    out = jitted_forward(tiny_model, input_ids, positions, segment_ids)
    params = reference_params(tiny_model)
    counts = np.zeros_like(np.asarray(out.moe_stats.expert_counts))
    mtp_counts = np.zeros_like(np.asarray(out.mtp_stats.expert_counts))
    for row in range(input_ids.shape[0]):
        valid = segment_ids[row] != 0
        ref = numpy_reference.forward(
            params, tiny_model.config, input_ids[row], positions[row], segment_ids[row]
        )
        np.testing.assert_allclose(
            out.logits[row][valid], ref["logits"][valid], atol=2e-4, rtol=2e-4
        )
        np.testing.assert_allclose(
            out.mtp_logits[row][valid], ref["mtp_logits"][valid], atol=2e-4, rtol=2e-4
        )
        counts += ref["counts"]
        mtp_counts += ref["mtp_counts"]
    np.testing.assert_array_equal(out.moe_stats.expert_counts, counts)
    np.testing.assert_array_equal(out.mtp_stats.expert_counts, mtp_counts)


def test_documents_do_not_see_each_other(tiny_model, jitted_forward):
    """Packing two documents in one row gives each the logits it has alone."""
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(0, 256, 6), rng.integers(0, 256, 6)
    packed = np.concatenate([doc_a, doc_b])[None].astype(np.int32)
    positions = np.array([list(range(6)) * 2], np.int32)
    segments = np.array([[1] * 6 + [2] * 6], np.int32)
    out = jitted_forward(tiny_model, packed, positions, segments)
    ones = np.ones((1, 12), np.int32)
    for doc, sl in ((doc_a, slice(0, 6)), (doc_b, slice(6, 12))):
        alone = np.concatenate([doc, np.zeros(6, doc.dtype)])[None].astype(np.int32)
        ref = jitted_forward(tiny_model, alone, np.arange(12, dtype=np.int32)[None], ones)
        np.testing.assert_allclose(out.logits[0, sl], ref.logits[0, :6], atol=1e-5)


def test_scan_equals_unrolled(tiny_model, packed_batch):
    cfg = tiny_config()
    cfg.scan_layers = False
    unrolled = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(1)))
    nnx.update(unrolled, nnx.state(tiny_model))
    forward = nnx.jit(lambda m, batch: m(*batch))
    scanned_out = forward(tiny_model, packed_batch)
    unrolled_out = forward(unrolled, packed_batch)
    for a, b in zip(jax.tree.leaves(scanned_out), jax.tree.leaves(unrolled_out), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_expert_bias_is_fp32_whatever_the_param_dtype():
    cfg = tiny_config()
    cfg.param_dtype = "bfloat16"
    cfg.dtype = "bfloat16"
    model = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
    biases = nnx.state(model, ExpertBias)
    assert {leaf.dtype for leaf in jax.tree.leaves(biases)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
        jnp.dtype(jnp.bfloat16)
    }


def test_expert_bias_gets_no_gradient(tiny_model):
    def loss(m, ids):
        out = m(ids)
        return jnp.mean(out.logits) + jnp.mean(out.mtp_logits)

    grads = nnx.jit(nnx.grad(loss))(tiny_model, jnp.zeros((1, 8), jnp.int32))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads)]
    assert paths and not [p for p in paths if "expert_bias" in p]
    assert len(paths) == len(jax.tree.leaves(nnx.state(tiny_model, nnx.Param)))


def test_expert_bias_steers_selection_only(tiny_model, packed_batch, jitted_forward):
    """A large bias on one expert forces its selection in every layer."""
    model = nnx.clone(tiny_model)
    bias = model.moe_layers.blocks.ffn.router.expert_bias
    bias[...] = bias[...].at[:, 5].set(10.0)
    out = jitted_forward(model, *packed_batch)
    valid_tokens = int((packed_batch[2] != 0).sum())
    np.testing.assert_array_equal(out.moe_stats.expert_counts[:, 5], valid_tokens)


def test_output_shapes_without_mtp(packed_batch):
    cfg = tiny_config()
    cfg.mtp.num_layers = 0
    model = nnx.eval_shape(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(lambda m, ids: m(ids), model, packed_batch[0])
    assert out.logits.shape == (2, 12, cfg.vocab_size)
    assert out.mtp_logits is None and out.mtp_stats is None
    assert out.moe_stats.expert_counts.shape == (cfg.num_layers - 1, cfg.moe.num_experts)
    assert not hasattr(model, "mtp") or model.mtp is None


def test_mtp_shift_and_causality(tiny_model, jitted_forward):
    """MTP position t sees tokens up to t + 1 only; the last position's next token is 0."""
    from ling_jax.model.mtp import shift_left

    np.testing.assert_array_equal(shift_left(jnp.array([[5, 6, 7]])), [[6, 7, 0]])
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 256, size=(1, 10)).astype(np.int32)
    changed = ids.copy()
    changed[0, 6] = (ids[0, 6] + 1) % 256
    pos = np.arange(10, dtype=np.int32)[None]
    seg = np.ones((1, 10), np.int32)
    a = jitted_forward(tiny_model, ids, pos, seg)
    b = jitted_forward(tiny_model, changed, pos, seg)
    # Token 6 enters MTP position 5 (as the next-token embedding) and main position 6.
    np.testing.assert_allclose(a.mtp_logits[0, :5], b.mtp_logits[0, :5], atol=1e-6)
    assert not np.allclose(a.mtp_logits[0, 5], b.mtp_logits[0, 5])
    np.testing.assert_allclose(a.logits[0, :6], b.logits[0, :6], atol=1e-6)


def test_parameter_count_matches_the_model(tiny_model):
    from ling_jax.model import count_params

    count = count_params(tiny_model.config)
    params = nnx.state(tiny_model, nnx.Param)
    biases = nnx.state(tiny_model, ExpertBias)
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == count.total
    assert sum(leaf.size for leaf in jax.tree.leaves(biases)) == count.expert_bias
