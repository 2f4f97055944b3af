"""Grouped matmul kernels for the routed experts: Pallas TPU (Mosaic) and GPU (Triton), each
with an interpret mode for CPU."""

from pallas_kernels.gmm.ops import gmm, scaled_matmul_gpu, tgmm
from pallas_kernels.gmm.reference import gmm_reference, tgmm_reference
from pallas_kernels.gmm.tuning import GpuTiling, Tiling, default_gpu_tiling, default_tiling

__all__ = [
    "GpuTiling",
    "Tiling",
    "default_gpu_tiling",
    "default_tiling",
    "gmm",
    "gmm_reference",
    "scaled_matmul_gpu",
    "tgmm",
    "tgmm_reference",
]
