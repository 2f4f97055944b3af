"""FP8 (E4M3) block scaling: 1 x 128 activation tiles, 128 x 128 weight blocks (SPEC section 9)."""

from pallas_kernels.fp8.ops import (
    dequantize_blockwise,
    dequantize_rowwise,
    gmm_fp8,
    quantize_blockwise,
    quantize_rowwise,
)

__all__ = [
    "dequantize_blockwise",
    "dequantize_rowwise",
    "gmm_fp8",
    "quantize_blockwise",
    "quantize_rowwise",
]
