"""Collective bytes and loop-aware matmul FLOPs read from program text."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ling_jax.parallel.hlo_stats import collective_bytes, hlo_collectives, stablehlo_dots

# Shaped like a compiled TPU module: layouts, tiling suffixes, a token and an async pair.
HLO = """
ENTRY %main.1 (p0: bf16[64,128], p1: s32[4]) -> bf16[256,128] {
  %p0 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %buf = bf16[256,128]{1,0:T(8,128)(2,1)} broadcast(%c), dimensions={}
  %tok = token[] after-all()
  %ragged_all_to_all.1 = bf16[256,128]{1,0:T(8,128)(2,1)} ragged-all-to-all(%p0, %buf, %a, %b, %c, /*index=5*/%d), channel_id=1
  %all_to_all.2 = s32[4,1]{1,0} all-to-all(%p1x), channel_id=2, dimensions={0}
  %all-gather-start = (f32[16], f32[128]) all-gather-start(%x), channel_id=3
  %all-gather-done = f32[128]{0} all-gather-done(%all-gather-start)
  ROOT %all-reduce.3 = f32[8,8]{1,0} all-reduce(%y), to_apply=%add
}
"""  # noqa: E501


def test_collectives_from_compiled_hlo():
    found = {c.name: c for c in hlo_collectives(HLO)}
    ragged = found["ragged_all_to_all.1"]
    # The ragged exchange's data operand is the [64, 128] rows, not the [256, 128] buffer.
    assert (ragged.op, ragged.operand_bytes, ragged.result_bytes) == (
        "ragged-all-to-all",
        64 * 128 * 2,
        256 * 128 * 2,
    )
    # Unknown operand (%p1x is not defined here): its result size stands in.
    assert found["all_to_all.2"].operand_bytes == 16
    assert collective_bytes(HLO) == {
        "ragged-all-to-all": (1, 64 * 128 * 2),
        "all-to-all": (1, 16),
        "all-gather": (1, 512),  # Once, at the done, with its result size.
        "all-reduce": (1, 256),
    }


def test_dots_inside_loops_and_calls_carry_their_loop_depth():
    def f(x, w, n):
        def body(c, _):  # scan: its body is outlined into a called function
            return jnp.einsum("ctk,ckn->ctn", c, w), None

        y = jax.lax.scan(body, x, None, length=10)[0]
        y = jax.lax.fori_loop(0, n, lambda i, c: jnp.tanh(c) @ w, y)  # data-dependent trips
        return jnp.einsum("abk,kn->abn", y, w[0])  # once: [3, 8, 8] x [8, 8]

    x = jax.ShapeDtypeStruct((3, 8, 8), jnp.float32)
    dots = stablehlo_dots(jax.jit(f).lower(x, x, 3).as_text())
    by_depth = sorted((d.loop_depth, d.flops) for d in dots)
    batched = 2 * 3 * 8 * 8 * 8  # 3 batched [8, 8] x [8, 8]
    assert by_depth == [(0, batched), (1, batched), (1, batched)]
