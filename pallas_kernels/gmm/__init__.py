"""Grouped matmul kernels for the routed experts (Pallas TPU, with interpret mode for CPU)."""

from pallas_kernels.gmm.ops import gmm, tgmm
from pallas_kernels.gmm.reference import gmm_reference, tgmm_reference
from pallas_kernels.gmm.tuning import Tiling, default_tiling

__all__ = ["Tiling", "default_tiling", "gmm", "gmm_reference", "tgmm", "tgmm_reference"]
