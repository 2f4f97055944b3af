"""Block sizes for the grouped matmul kernels: a small table for the Ling expert shapes and a rule
(TPU, `Tiling`), and a small rule for the Triton GPU kernels (`GpuTiling`, at the end).

A `Tiling` names blocks on the forward problem's dims: lhs [m, k] @ rhs[g] [k, n]. The backward
kernels reuse it on the same dims (d lhs = gmm(grad [m, n], rhs^T) reduces over n with n-blocks
of `tn` and writes k-blocks of `tk`; tgmm writes [tk, tn] blocks), so one tiling serves all three.

Why the rule looks the way it does (HBM traffic of the kernels in `tpu.py`):
  * The grid is (output column blocks, row-tile visits, reduction blocks). When the reduction
    fits one block (tk = k), consecutive visits of the same row tile (a tile straddling two
    groups) or of the same group (a group spanning several tiles) keep their block index, and
    Pallas skips the DMA: lhs, rhs and out each move through HBM exactly once per column block.
    With tk < k every visit re-streams its lhs tile and its group's rhs, i.e. rhs traffic grows
    to (m / tm + num_groups) / num_groups times the weights. So: tk = k whenever it fits.
  * Every column block re-reads lhs, so tn is as wide as fits. When the blocks do not fit,
    tn gives way first (down to 512), then tm (down to 256), and only then tk.
  * tm = 512 amortises the per-step overhead (~0.35 us) and the block DMAs; `sub_m` bounds the
    waste of row tiles that straddle groups: only row sub-tiles overlapping the visited group
    are multiplied, so E groups cost about m + E * sub_m computed rows instead of m + E * tm.
    sub_m is the MXU width (128 on v5e/v5p, 256 on v6e): streaming fewer rows than that per
    weight load would leave the MXU bound on loading weights. At Ling's m / E = 256 rows per
    expert this still computes ~1.5x the useful rows (benchmarks/kernels_tpu_estimate.py).
  * The double-buffered blocks, the fp32 accumulator and the operand values the kernel loads
    must fit `VMEM_BUDGET`, below the smallest VMEM we target (v5p: 64 MiB per core); the kernel
    raises the compiler's scoped-VMEM limit to what the tiling needs. tgmm has its own fit
    (`fit_tgmm`): its [tk, tn] output block and accumulator are the large ones there.

On megacore chips (v4, v5p) the first "parallel" grid axis is split over two TensorCores, so
there must be at least two column blocks (gmm) / output blocks (tgmm): tn (tk) is halved when
one block would cover the dim.

The table holds the Ling-mini/flash/1T expert shapes (k, n) = (d, d_e) and (d_e, d) for bf16.
Its entries are the rule's choices (tests/kernels/test_gmm.py checks they fit the budget;
benchmarks/kernels_tpu_estimate.py compiles them for a TPU topology); they have NOT been timed
on hardware yet. Measure on a TPU and edit the table; the rule stays the fallback.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

VMEM_BUDGET = 40 << 20
_MAX_TM = 512
_MAX_TN = 2048
_MIN_TM = 32  # Sublane tiling of the narrowest dtype (fp8: 32 rows per vreg tile).


class Tiling(NamedTuple):
    """Block sizes on the forward dims: rows `tm`, reduction `tk`, output columns `tn`.

    tm: rows per row tile; a multiple of 32, or m itself.
    tk, tn: multiples of 128, or the full dim. A dim that is not a multiple of its block gets a
      partial last block (masked in the kernel where it matters).
    sub_m: rows per MXU sub-tile inside a row tile (divides tm); 0 means tm.
    """

    tm: int
    tk: int
    tn: int
    sub_m: int = 0


# (k, n) -> (tm, tk, tn) for bf16 operands and m >= tm; sub_m and the megacore split follow the
# rule. Pinned so that a change of the rule cannot silently move the production shapes; replace
# with measured values.
TABLE: dict[tuple[int, int], tuple[int, int, int]] = {
    (2048, 512): (512, 2048, 512),  # mini gate/up: [m, d] x [d, d_e]
    (512, 2048): (512, 512, 2048),  # mini down: [m, d_e] x [d_e, d]
    (4096, 1024): (512, 4096, 1024),  # flash gate/up
    (1024, 4096): (512, 1024, 2048),  # flash down
    (8192, 2048): (256, 8192, 512),  # 1T gate/up: tm gives way so that tk = k fits
    (2048, 8192): (512, 2048, 2048),  # 1T down
}


def gmm_vmem_bytes(t: Tiling, in_bytes: int, out_bytes: int, scaled: bool = False) -> int:
    """VMEM of one gmm step: double-buffered lhs, rhs and out blocks, the fp32 accumulator, and
    the operand values the kernel loads (one row sub-tile of lhs and the rhs block, in the
    compute dtype) with their fp32 product."""
    sub = t.sub_m or t.tm
    compute_bytes = max(in_bytes, 2)
    blocks = t.tm * t.tk * in_bytes + t.tk * t.tn * in_bytes + t.tm * t.tn * out_bytes
    if scaled:  # Scale blocks, lane/sublane padded: [tm, k / 128] and [k / 128, tn].
        blocks += (t.tm * 128 + 64 * t.tn) * 4
    values = (sub * t.tk + t.tk * t.tn) * compute_bytes + sub * t.tn * 4 * (2 if scaled else 1)
    return 2 * blocks + t.tm * t.tn * 4 + values


def tgmm_vmem_bytes(t: Tiling, in_bytes: int, out_bytes: int) -> int:
    """VMEM of one tgmm step: double-buffered lhs [tm, tk], grad [tm, tn] and out [tk, tn]
    blocks, the fp32 [tk, tn] accumulator, and the loaded (masked) operand values."""
    sub = t.sub_m or t.tm
    blocks = t.tm * t.tk * in_bytes + t.tm * t.tn * in_bytes + t.tk * t.tn * out_bytes
    values = sub * (t.tk + t.tn) * max(in_bytes, 2) * 2 + t.tk * t.tn * 4
    return 2 * blocks + t.tk * t.tn * 4 + values


def _divisor_block(dim: int, cap: int) -> int:
    """Largest multiple of 128 <= cap dividing dim; dim itself if dim <= cap; else cap."""
    if dim <= cap:
        return dim
    for block in range(cap - cap % 128, 127, -128):
        if dim % block == 0:
            return block
    return cap


def _shrink(block: int, dim: int) -> int:
    """Next smaller candidate for a k/n block: a multiple of 128, dividing dim if possible."""
    if block <= 128:
        return block
    return _divisor_block(dim, max(128, (block // 2) // 128 * 128))


def is_megacore(device_kind: str | None) -> bool:
    """v4 and v5p chips: two TensorCores share the first "parallel" grid axis."""
    kind = (device_kind or "").lower()
    return kind in ("tpu v4", "tpu v5", "tpu v5p")


def default_sub_m(device_kind: str | None = None) -> int:
    """MXU-sized row sub-tile: 256 on v6e (256x256 MXU), else 128."""
    kind = (device_kind or "").lower().replace(" ", "")
    return 256 if any(tag in kind for tag in ("v6", "v7", "tpu7")) else 128


def default_tiling(
    m: int,
    k: int,
    n: int,
    *,
    dtype=jnp.bfloat16,
    out_dtype=None,
    device_kind: str | None = None,
) -> Tiling:
    """The tiling for lhs [m, k] x rhs [g, k, n] (see the module docstring for the rule)."""
    in_bytes = jnp.dtype(dtype).itemsize
    out_bytes = jnp.dtype(out_dtype or dtype).itemsize
    scaled = in_bytes == 1
    tm = m if m <= _MAX_TM else _MAX_TM
    if (k, n) in TABLE and in_bytes == 2 and m >= TABLE[(k, n)][0]:
        tm, tk, tn = TABLE[(k, n)]
    else:
        tk, tn = k, _divisor_block(n, _MAX_TN)
        sub = default_sub_m(device_kind)
        while gmm_vmem_bytes(Tiling(tm, tk, tn, sub), in_bytes, out_bytes, scaled) > VMEM_BUDGET:
            if tn > 512 and _shrink(tn, n) < tn:
                tn = _shrink(tn, n)
            elif tm > 256:
                tm //= 2  # Before tk: tk < k would re-fetch every visit's weights.
            elif tk > 512 and _shrink(tk, k) < tk:
                tk = _shrink(tk, k)
            elif tn > 128 and _shrink(tn, n) < tn:
                tn = _shrink(tn, n)
            elif tm > 128:
                tm //= 2
            else:
                break
    if is_megacore(device_kind) and tn == n and n >= 256:
        tn = _shrink(tn, n)  # Two column blocks, one per TensorCore; lhs is read twice.
    sub = default_sub_m(device_kind)
    sub_m = sub if (tm > sub and tm % sub == 0) else 0
    return Tiling(tm, tk, tn, sub_m)


def fit_tgmm(
    t: Tiling, k: int, n: int, in_bytes: int, out_bytes: int, device_kind: str | None = None
) -> Tiling:
    """Shrink a (gmm) tiling until tgmm's blocks fit `VMEM_BUDGET`: tgmm's k is not a reduction,
    so a smaller tk costs only re-reads of grad; tk goes first, then tn. On megacore chips,
    also ensure two (k, n) output blocks, one per TensorCore."""
    if is_megacore(device_kind) and t.tk >= k and t.tn >= n and k >= 256:
        t = t._replace(tk=_shrink(min(t.tk, k), k))
    while tgmm_vmem_bytes(t, in_bytes, out_bytes) > VMEM_BUDGET:
        if t.tk > 128 and _shrink(t.tk, k) < t.tk:
            t = t._replace(tk=_shrink(t.tk, k))
        elif t.tn > 128 and _shrink(t.tn, n) < t.tn:
            t = t._replace(tn=_shrink(t.tn, n))
        else:
            break
    return t


def validate_tiling(t: Tiling, m: int, k: int, n: int, *, scaled: bool = False) -> Tiling:
    """Clamp blocks to the dims and check Mosaic's layout rules; raise naming the bad field."""
    tm = min(t.tm, m) if t.tm >= m else t.tm
    tk = k if t.tk >= k else t.tk
    tn = n if t.tn >= n else t.tn
    if tm != m and tm % _MIN_TM:
        raise ValueError(f"tiling.tm={t.tm} must be a multiple of {_MIN_TM} or >= m={m}.")
    for name, block, dim in (("tk", tk, k), ("tn", tn, n)):
        if block != dim and block % 128:
            raise ValueError(f"tiling.{name}={block} must be a multiple of 128 or >= {dim}.")
    if scaled and tk != k and tk % 128:
        raise ValueError(f"FP8 gmm needs tiling.tk % 128 == 0 (per-128 rescaling), got {tk}.")
    sub_m = t.sub_m if (t.sub_m and t.sub_m < tm) else 0
    if sub_m and (tm % sub_m or sub_m % 8):
        raise ValueError(
            f"tiling.sub_m={t.sub_m} must divide tm={tm} and be a multiple of 8 (or be 0)."
        )
    return Tiling(tm, tk, tn, sub_m)


# --- GPU (Triton, `gpu.py`) -----------------------------------------------------------------------

_GPU_MIN_BLOCK = 16  # Triton's dot needs every dim >= 16.


class GpuTiling(NamedTuple):
    """Blocks and launch parameters of the Triton kernels, on the forward dims like `Tiling`.

    tm: rows per program (gmm); rows per reduction step (tgmm).
    tk: reduction step (gmm); rows of tgmm's [tk, tn] output block.
    tn: output columns per program.
    num_warps: warps per program (4 = one Hopper warpgroup).
    num_stages: depth of Triton's software pipeline over the reduction loop.
    Block dims are powers of two >= 16 (Triton tensors); a block larger than its dim is masked.
    """

    tm: int
    tk: int
    tn: int
    num_warps: int = 4
    num_stages: int = 3


def _pow2_block(cap: int, dim: int) -> int:
    """cap, or the smallest power of two >= dim (at least 16) if that is smaller."""
    return max(_GPU_MIN_BLOCK, min(cap, 1 << max(dim - 1, 0).bit_length()))


def default_gpu_tiling(
    m: int, r: int, c: int, *, dtype=jnp.bfloat16, num_groups: int = 1, tgmm: bool = False
) -> GpuTiling:
    """The Triton blocks of one kernel call, in that call's terms (not measured yet: a rule).

    gmm (lhs [m, r] @ w [r, c]): tm = 64 rows while the mean group has < 256 rows, else 128: a
    row tile straddling a group boundary is computed once per group, so tm bounds the waste per
    group, and 64 rows is still one full wgmma (m64nNk16) per warpgroup. tn = 128 columns. The
    reduction step is 128 bytes of a row (32 fp32 / 64 bf16 / 128 E4M3 elements): one swizzled
    shared-memory line. Eight warps for 128 x 128 accumulators (128 fp32 registers a thread
    with four). Three stages: 3 * (tm * tk + tk * tn) * bytes <= 96 KiB of shared memory.
    tgmm (lhs [m, r]^T @ grad [m, c], call it with tgmm=True): a [128, 256] output block per
    (group, block) program, the group's rows reduced 128 bytes at a time, eight warps.
    Each block is capped at the dim rounded up to a power of two (>= 16).

    Measured on an H100 (`python -m benchmarks.gpu_tiling_sweep`, bf16, m = 65536 rows over
    64 skewed groups, k = 2048, n = 512, forward only): gmm's (128, 64, 128, 8 warps, 3 stages)
    was the best of seven candidates at 173 TFLOP/s (the others 129-150); tgmm's [128, 256]
    block gave 305 TFLOP/s against 217 for [128, 128]; FP8 gmm was best at (128, 128, 128, 8,
    3), 109 TFLOP/s (144 with the weights stored K-major).
    """
    itemsize = min(jnp.dtype(dtype).itemsize, 4)
    step = max(_GPU_MIN_BLOCK, 128 // itemsize)  # 128 bytes: 32 fp32, 64 bf16, 128 E4M3.
    if tgmm:
        tm, tk, tn = _pow2_block(step, m), _pow2_block(128, r), _pow2_block(256, c)
        warps = 8 if tk * tn >= 128 * 128 else 4
    else:
        rows = 128 if m >= 256 * max(num_groups, 1) else 64
        tm, tk, tn = _pow2_block(rows, m), _pow2_block(step, r), _pow2_block(128, c)
        warps = 8 if tm * tn >= 128 * 128 else 4
    return GpuTiling(tm, tk, tn, num_warps=warps, num_stages=3)


def validate_gpu_tiling(t) -> GpuTiling:
    """A `GpuTiling` from one, from a `Tiling` (sub_m dropped) or from (tm, tk, tn[, warps[,
    stages]]); raise naming the field that is not a power of two >= 16."""
    if isinstance(t, Tiling):
        t = GpuTiling(t.tm, t.tk, t.tn)
    elif not isinstance(t, GpuTiling):
        if len(t) not in (3, 4, 5):
            raise ValueError(
                f"GPU tiling must be (tm, tk, tn[, num_warps[, num_stages]]), got {t!r}."
            )
        t = GpuTiling(*(int(x) for x in t))
    for name in ("tm", "tk", "tn"):
        block = getattr(t, name)
        if block < _GPU_MIN_BLOCK or block & (block - 1):
            raise ValueError(f"tiling.{name}={block} must be a power of two >= 16 on GPU.")
    if t.num_warps not in (1, 2, 4, 8, 16) or t.num_stages < 1:
        raise ValueError(f"tiling.num_warps={t.num_warps} / num_stages={t.num_stages} invalid.")
    return t
