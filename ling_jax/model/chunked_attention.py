"""Memory-efficient ("flash") causal attention over chunks, in pure JAX with a custom VJP.

The sequence is cut into chunks of `chunk_size` tokens. For each query chunk i, an online
softmax runs over the key/value chunks j <= i (chunks above the diagonal are skipped, not
masked), keeping only a running max `m`, a running denominator `l` and an fp32 output
accumulator per query row:

    s_ij = q_i k_j^T / sqrt(d)            (fp32; masked: causal and same segment)
    m'   = max(m, rowmax s_ij)
    l    = l exp(m - m') + rowsum exp(s_ij - m')
    o    = o exp(m - m') + exp(s_ij - m') v_j
    out  = o / l,   lse = m + log l        (lse is the only residual besides q, k, v, out)

The backward pass recomputes each tile's probabilities from `lse` (FlashAttention-2): for key
chunk j it visits the query chunks i >= j, accumulating dk_j, dv_j and adding into dq_i. Peak
memory is O(seq * heads * head_dim) plus one [chunk, chunk] tile per head, instead of the
[seq, seq] score matrix, forward and backward alike.

Masking matches `attention.attention_mask`: a query attends to keys at or before it with the
same segment id (0 marks padding, which attends to padding). Every query sees at least itself,
so no row is empty.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_PAD_SEGMENT = -1  # Segment id of the tokens added to round the sequence up to whole chunks.
# Floor of the running max: finite, so a tile whose keys are all masked rescales by exp(0), not
# by exp(-inf - -inf) = nan.
_MAX_FLOOR = -1e30


def _tile_mask(seg_q, seg_k, i, j, chunk):
    """Causal and same-segment mask of tile (i, j).

    seg_q, seg_k: [batch, chunk]; returns [batch, 1, 1, chunk_q, chunk_k] bool
    """
    q_pos = i * chunk + jnp.arange(chunk)
    k_pos = j * chunk + jnp.arange(chunk)
    causal = k_pos[None, :] <= q_pos[:, None]
    same = seg_q[:, :, None] == seg_k[:, None, :]
    return (causal[None] & same)[:, None, None]


def _scores(q_i, k_j, scale):
    # q_i: [batch, chunk, kv_heads, group, head_dim]; k_j: [batch, chunk, kv_heads, head_dim]
    s = jnp.einsum("bqngd,bknd->bngqk", q_i, k_j, preferred_element_type=jnp.float32)
    return s * scale  # [batch, kv_heads, group, chunk_q, chunk_k] fp32


def _split_chunks(q, k, v, segment_ids, chunk):
    """[batch, seq, ...] -> [num_chunks, batch, chunk, ...] (q grouped by kv head)."""
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    n = seq // chunk
    qc = q.reshape(batch, n, chunk, kv_heads, q_heads // kv_heads, head_dim).swapaxes(0, 1)
    kc = k.reshape(batch, n, chunk, kv_heads, head_dim).swapaxes(0, 1)
    vc = v.reshape(batch, n, chunk, kv_heads, head_dim).swapaxes(0, 1)
    sc = segment_ids.reshape(batch, n, chunk).swapaxes(0, 1)
    return qc, kc, vc, sc


def _forward(q, k, v, segment_ids, chunk):
    """Returns out [batch, seq, q_heads, head_dim] (v's dtype) and lse [n, b, kv, g, chunk]."""
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    qc, kc, vc, sc = _split_chunks(q, k, v, segment_ids, chunk)

    def query_chunk(args):
        q_i, seg_i, i = args

        def kv_step(j, carry):
            o, m, denom = carry
            s = _scores(q_i, kc[j], scale)
            mask = _tile_mask(seg_i, sc[j], i, j, chunk)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            denom = denom * correction + p.sum(-1)
            pv = jnp.einsum(
                "bngqk,bknd->bngqd", p.astype(v.dtype), vc[j], preferred_element_type=jnp.float32
            )
            return o * correction[..., None] + pv, m_new, denom

        o = jnp.zeros((batch, kv_heads, group, chunk, head_dim), jnp.float32)
        m = jnp.full((batch, kv_heads, group, chunk), _MAX_FLOOR, jnp.float32)
        denom = jnp.zeros((batch, kv_heads, group, chunk), jnp.float32)
        o, m, denom = jax.lax.fori_loop(0, i + 1, kv_step, (o, m, denom))  # causal: j <= i
        safe = jnp.where(denom > 0, denom, 1.0)
        out = o / safe[..., None]
        lse = jnp.where(denom > 0, m + jnp.log(safe), jnp.inf)  # inf: an empty row's p = 0
        return out.astype(v.dtype), lse

    n = seq // chunk
    out, lse = jax.lax.map(query_chunk, (qc, sc, jnp.arange(n)))
    # out: [n, batch, kv_heads, group, chunk, head_dim] -> [batch, seq, q_heads, head_dim]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, seq, q_heads, head_dim)
    return out, lse


def _backward(q, k, v, segment_ids, out, lse, d_out, chunk):
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    n = seq // chunk
    scale = 1.0 / math.sqrt(head_dim)
    qc, kc, vc, sc = _split_chunks(q, k, v, segment_ids, chunk)
    # dO and delta = rowsum(dO * O), grouped like the tiles: [n, batch, kv, group, chunk, ...]
    d_out_c = d_out.reshape(batch, n, chunk, kv_heads, group, head_dim).transpose(1, 0, 3, 4, 2, 5)
    out_c = out.reshape(batch, n, chunk, kv_heads, group, head_dim).transpose(1, 0, 3, 4, 2, 5)
    delta = jnp.sum(d_out_c.astype(jnp.float32) * out_c.astype(jnp.float32), axis=-1)

    def key_chunk(j, carry):
        dq, dk, dv = carry
        k_j, v_j, seg_j = kc[j], vc[j], sc[j]

        def query_step(i, inner):
            dq, dk_j, dv_j = inner
            s = _scores(qc[i], k_j, scale)
            mask = _tile_mask(sc[i], seg_j, i, j, chunk)
            p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)  # [b, n, g, cq, ck]
            do_i = d_out_c[i]  # [b, kv, g, cq, d]
            dv_j = dv_j + jnp.einsum(
                "bngqk,bngqd->bknd", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bngqd,bknd->bngqk", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[i][..., None]) * scale
            dq_i = jnp.einsum(
                "bngqk,bknd->bqngd", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32
            )
            dq = dq.at[i].add(dq_i)
            dk_j = dk_j + jnp.einsum(
                "bngqk,bqngd->bknd", ds.astype(q.dtype), qc[i], preferred_element_type=jnp.float32
            )
            return dq, dk_j, dv_j

        zeros = jnp.zeros((batch, chunk, kv_heads, head_dim), jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(j, n, query_step, (dq, zeros, zeros))  # causal: i >= j
        return dq, dk.at[j].set(dk_j), dv.at[j].set(dv_j)

    dq = jnp.zeros((n, batch, chunk, kv_heads, group, head_dim), jnp.float32)
    dk = jnp.zeros((n, batch, chunk, kv_heads, head_dim), jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(0, n, key_chunk, (dq, dk, jnp.zeros_like(dk)))
    dq = dq.swapaxes(0, 1).reshape(q.shape).astype(q.dtype)
    dk = dk.swapaxes(0, 1).reshape(k.shape).astype(k.dtype)
    dv = dv.swapaxes(0, 1).reshape(v.shape).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(q, k, v, segment_ids, chunk):
    return _forward(q, k, v, segment_ids, chunk)[0]


def _chunked_fwd(q, k, v, segment_ids, chunk):
    out, lse = _forward(q, k, v, segment_ids, chunk)
    return out, (q, k, v, segment_ids, out, lse)


def _chunked_bwd(chunk, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, segment_ids, out, lse, d_out, chunk)
    return dq, dk, dv, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    chunk_size: int = 512,
) -> jax.Array:
    """Causal, segment-masked GQA attention without the [seq, seq] score matrix.

    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]
    segment_ids: [batch, seq] int (0 marks padding)
    returns: [batch, seq, q_heads, head_dim] in v's dtype; equal (up to fp32 rounding) to
    `dot_product_attention(q, k, v, attention_mask(segment_ids))`, gradients included.
    """
    batch, seq, q_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, seq) or q_heads % k.shape[2]:
        raise ValueError(f"chunked_attention: incompatible q {q.shape}, k {k.shape}, v {v.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunked_attention: chunk_size = {chunk_size}, expected >= 1")
    chunk = min(chunk_size, seq)
    pad = -seq % chunk
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
    out = _chunked(q, k, v, segment_ids.astype(jnp.int32), chunk)
    return out[:, :seq]
