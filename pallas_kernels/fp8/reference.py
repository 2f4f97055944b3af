"""Pure-jnp FP8 (E4M3) block scaling: the bit-exact target of the kernels in `tpu.py`.

The recipe is TransformerEngine's `Float8BlockScaling` (SPEC section 9): activations and
gradients get one fp32 scale per [1 x 128] tile along the reduction dim ("rowwise"), weights one
per [128 x 128] block ("blockwise"). For a tile with absolute maximum `amax`:

    scale = amax / 448                   (448 = largest finite E4M3 value)
    scale = 2 ** ceil(log2(scale))       if power_of_two_scale (then x / scale is exact)
    scale = 1                            if amax == 0
    q     = float8_e4m3fn(clip(x / scale, -448, 448))

so that `q * scale` approximates x. The clip makes the cast saturate: an fp32 quotient that
rounds above 448 would otherwise become NaN (E4M3 has no inf). A trailing partial tile (k or n
not a multiple of 128) gets its own scale from its valid elements. Non-finite inputs are out of
scope (a NaN in a tile makes its scale NaN).

The kernels must reproduce these bits exactly, so both share `compute_scale` and
`scale_and_cast`, which use only ops that Mosaic lowers (no frexp/log2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

E4M3_MAX = 448.0
FP8_DTYPE = jnp.float8_e4m3fn
BLOCK = 128


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def compute_scale(amax: jax.Array, power_of_two_scale: bool) -> jax.Array:
    """fp32 scale from a tile's fp32 absolute maximum (any shape, elementwise)."""
    scale = amax.astype(jnp.float32) / jnp.float32(E4M3_MAX)
    if power_of_two_scale:
        # Round up to a power of two on the bits: add the largest mantissa and clear the mantissa.
        # Exact for normal floats; a subnormal scale becomes 2^-126, still >= the exact value.
        bits = jax.lax.bitcast_convert_type(scale, jnp.int32)
        bits = (bits + jnp.int32(0x007FFFFF)) & jnp.int32(-0x00800000)
        scale = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(amax == 0, jnp.float32(1.0), scale)


def scale_and_cast(x: jax.Array, scale: jax.Array) -> jax.Array:
    """float8_e4m3fn(clip(x / scale)); `scale` broadcasts against x."""
    q = x.astype(jnp.float32) / scale
    return jnp.clip(q, -E4M3_MAX, E4M3_MAX).astype(FP8_DTYPE)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)  # Zeros never raise an amax.


def quantize_rowwise(
    x: jax.Array, tile: int = BLOCK, power_of_two_scale: bool = False
) -> tuple[jax.Array, jax.Array]:
    """x: [m, k] -> (q: [m, k] e4m3, scale: [m, ceil(k / tile)] fp32), one scale per 1 x tile."""
    m, k = x.shape
    tiles = cdiv(k, tile)
    xt = _pad_to(x.astype(jnp.float32), 1, tile).reshape(m, tiles, tile)
    scale = compute_scale(jnp.max(jnp.abs(xt), axis=2), power_of_two_scale)  # [m, tiles]
    q = scale_and_cast(xt, scale[:, :, None]).reshape(m, tiles * tile)[:, :k]
    return q, scale


def e4m3_values(q: jax.Array) -> jax.Array:
    """fp32 values of E4M3 `q`, decoded from its bits (NaN codes are never produced here).

    Not `q.astype(float32)`: with its default excess-precision setting XLA:GPU collapses a
    chain of float converts, so in one program `float32(float8(x))` becomes x and a
    quantize-dequantize round trip would not round at all. Integer ops on the bits cannot be
    collapsed. For bits s eeee mmm: (-1)^s (8 + m) 2^(e - 10), or m 2^-9 when e = 0.
    """
    bits = jax.lax.bitcast_convert_type(q, jnp.uint8).astype(jnp.int32)
    exponent, mantissa = (bits >> 3) & 15, bits & 7
    significand = jnp.where(exponent > 0, mantissa + 8, mantissa).astype(jnp.float32)
    power = jax.lax.bitcast_convert_type((jnp.maximum(exponent, 1) + 117) << 23, jnp.float32)
    return jnp.where(bits >= 128, -1.0, 1.0) * significand * power  # 2^(max(e, 1) - 10)


def dequantize_rowwise(
    q: jax.Array, scale: jax.Array, tile: int = BLOCK, dtype=jnp.float32
) -> jax.Array:
    """Inverse of `quantize_rowwise`: [m, k] q * its tile's scale."""
    k = q.shape[1]
    full = jnp.repeat(scale, tile, axis=1, total_repeat_length=scale.shape[1] * tile)[:, :k]
    return (e4m3_values(q) * full).astype(dtype)


def quantize_blockwise(
    w: jax.Array, block: tuple[int, int] = (BLOCK, BLOCK), power_of_two_scale: bool = False
) -> tuple[jax.Array, jax.Array]:
    """w: [..., k, n] -> (q: [..., k, n] e4m3, scale: [..., ceil(k / bk), ceil(n / bn)] fp32).

    One scale per bk x bn block of the last two dims; leading dims (e.g. experts) are batched.
    """
    *batch, k, n = w.shape
    bk, bn = block
    kb, nb = cdiv(k, bk), cdiv(n, bn)
    wp = _pad_to(_pad_to(w.astype(jnp.float32), -2, bk), -1, bn)
    wb = wp.reshape(*batch, kb, bk, nb, bn)
    scale = compute_scale(jnp.max(jnp.abs(wb), axis=(-3, -1)), power_of_two_scale)  # [.., kb, nb]
    q = scale_and_cast(wb, scale[..., :, None, :, None]).reshape(*batch, kb * bk, nb * bn)
    return q[..., :k, :n], scale


def expand_block_scale(scale: jax.Array, shape: tuple[int, int], block: tuple[int, int]):
    """[..., kb, nb] block scales -> [..., k, n], each block's scale repeated over its block."""
    k, n = shape
    full = jnp.repeat(scale, block[0], axis=-2, total_repeat_length=scale.shape[-2] * block[0])
    full = jnp.repeat(full, block[1], axis=-1, total_repeat_length=scale.shape[-1] * block[1])
    return full[..., :k, :n]


def dequantize_blockwise(
    q: jax.Array, scale: jax.Array, block: tuple[int, int] = (BLOCK, BLOCK), dtype=jnp.float32
) -> jax.Array:
    """Inverse of `quantize_blockwise`."""
    full = expand_block_scale(scale, q.shape[-2:], block)
    return (e4m3_values(q) * full).astype(dtype)
