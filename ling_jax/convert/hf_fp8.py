"""FP8 HF checkpoints in the released Ling 2.0 format: E4M3 weights with 128 x 128 block scales.

The released FP8 export (inclusionAI Ling-V2 `tools/convert_dcp_to_safetensors.py`, SPEC
section 3; the DeepSeek-V3 FP8 format) stores each quantized linear `X.weight` [out, in] as
float8_e4m3fn beside `X.weight_scale_inv` float32 [ceil(out / 128), ceil(in / 128)], and
config.json gains

  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                          "weight_block_size": [128, 128]}

Despite its name `weight_scale_inv` is the dequantization multiplier: the weight is
`weight.float() * scale_inv`, each scale repeated over its block (a partial block at the edge
included). Quantized, as in the release: the linears of every decoder layer, the MTP layer's
included (attention query_key_value and dense, the dense layers' MLP, routed and shared experts).
Not quantized: embeddings, lm_head, norms, the router gate, the expert bias and the MTP eh_proj.

A block's scale is amax / 448 (1 for an all-zero block), rounded up to a power of two (UE8M0) for
attention.dense and the routed experts' gate/up projections, as the release does.
`quantize_block` is the numpy twin of `pallas_kernels.fp8.reference.quantize_blockwise` on the HF
[out, in] tensor, bit for bit; numpy keeps the converter streaming without a compile per shape.

Loading goes by the stored dtypes: every F8_E4M3 weight is dequantized with its scale_inv, so a
checkpoint that keeps more linears in bf16 (HF `modules_to_not_convert`) loads as well.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

E4M3_MAX = 448.0
FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_SAFETENSORS = "F8_E4M3"
_INV_E4M3_MAX = np.float32(1.0) / np.float32(E4M3_MAX)
BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"
QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": list(BLOCK),
}

# The tensors the released export quantizes (its `fp8_weight` set), and of those the ones with
# power-of-two scales. Names are those of `hf_layout`; the MTP layer is layer num_layers.
_LAYER = r"model\.layers\.\d+\."
_QUANTIZED = re.compile(
    _LAYER + r"(attention\.(query_key_value|dense)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up|down)_proj)\.weight"
)
_POW2_SCALE = re.compile(_LAYER + r"(attention\.dense|mlp\.experts\.\d+\.(gate|up)_proj)\.weight")

Spec = tuple[str, tuple[int, ...], np.dtype]


def is_quantized(name: str) -> bool:
    """Whether the released FP8 format stores HF tensor `name` as E4M3 + weight_scale_inv."""
    return _QUANTIZED.fullmatch(name) is not None


def power_of_two_scale(name: str) -> bool:
    """Whether the release rounds the block scales of `name` up to powers of two (UE8M0)."""
    return _POW2_SCALE.fullmatch(name) is not None


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(shape: Sequence[int], block: Sequence[int] = BLOCK) -> tuple[int, int]:
    """[out, in] -> [ceil(out / block[0]), ceil(in / block[1])]."""
    return _cdiv(shape[0], block[0]), _cdiv(shape[1], block[1])


def quantize_block(
    w: np.ndarray, block: Sequence[int] = BLOCK, power_of_two_scale: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """w: [out, in] -> (q: [out, in] float8_e4m3fn, scale_inv: [ceil(out/bo), ceil(in/bi)] fp32).

    q * scale_inv approximates w. Per block: scale = amax / 448 (rounded up to a power of two if
    asked, by the same bit operation as the reference), 1 where amax is 0; q = e4m3(clip(w /
    scale, -448, 448)). A partial block's amax is over its valid elements (zero padding).
    """
    (m, n), (bo, bi) = w.shape, block
    mb, nb = scale_shape(w.shape, block)
    x = w.astype(np.float32, copy=False)
    if (m, n) != (mb * bo, nb * bi):
        padded = np.zeros((mb * bo, nb * bi), np.float32)
        padded[:m, :n] = x
        x = padded
    blocks = x.reshape(mb, bo, nb, bi)
    amax = np.max(np.abs(blocks), axis=(1, 3))
    # XLA's algebraic simplifier turns the reference's divisions by a constant (448) and by a
    # broadcast (the block scale) into products with fp32 reciprocals; the same products here
    # keep scales and codes bit-identical to the reference as XLA runs it.
    scale = amax * _INV_E4M3_MAX
    if power_of_two_scale:
        bits = (scale.view(np.int32) + np.int32(0x007FFFFF)) & np.int32(-0x00800000)
        scale = bits.view(np.float32)
    scale = np.where(amax == 0, np.float32(1.0), scale).astype(np.float32)
    inv_scale = np.float32(1.0) / scale
    q = np.clip(blocks * inv_scale[:, None, :, None], -E4M3_MAX, E4M3_MAX).astype(FP8_DTYPE)
    return np.ascontiguousarray(q.reshape(mb * bo, nb * bi)[:m, :n]), scale


def dequantize_block(
    q: np.ndarray, scale_inv: np.ndarray, block: Sequence[int] = BLOCK
) -> np.ndarray:
    """float32 q * scale_inv, each scale repeated over its block: [out, in] float32."""
    (m, n), (bo, bi) = q.shape, block
    full = np.repeat(np.repeat(scale_inv.astype(np.float32), bo, axis=0)[:m], bi, axis=1)
    return q.astype(np.float32) * full[:, :n]


# Export ------------------------------------------------------------------------------------------


def fp8_specs(specs: Sequence[Spec]) -> list[Spec]:
    """The (name, shape, dtype) list of `fp8_tensors`: each quantized weight as E4M3, then its
    float32 scale_inv."""
    out: list[Spec] = []
    for name, shape, dtype in specs:
        if is_quantized(name):
            out.append((name, shape, FP8_DTYPE))
            out.append((scale_name(name), scale_shape(shape), np.dtype(np.float32)))
        else:
            out.append((name, shape, dtype))
    return out


def fp8_tensors(tensors: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Quantizes the tensors of `fp8_specs` one at a time; the others pass through.

    The quantized ones should come in their original precision (not cast first), so that the
    scales come from the model's own values.
    """
    for name, tensor in tensors:
        if not is_quantized(name):
            yield name, tensor
            continue
        if not np.all(np.isfinite(tensor)):
            raise ValueError(f"tensor {name!r} holds non-finite values; it cannot be quantized")
        q, scale = quantize_block(tensor, BLOCK, power_of_two_scale(name))
        yield name, q
        yield scale_name(name), scale


# Import ------------------------------------------------------------------------------------------


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(
        f"HF config.json key `quantization_config.{key}` = {value!r} is unsupported: "
        f"expected {expected}"
    )


def block_from_hf(hf: Mapping[str, Any]) -> tuple[int, int] | None:
    """The weight block size of config.json's `quantization_config`; None when it has none.

    Supported: quant_method "fp8", fmt "e4m3" (the default when absent), activation_scheme
    "dynamic" (weights only: a static scheme adds input scales this model has no place for) and
    a 2-entry weight_block_size of positive integers.
    """
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise ValueError(f"HF config.json key `quantization_config` = {qc!r} must be an object")
    if qc.get("quant_method") != "fp8":
        raise _bad("quant_method", qc.get("quant_method"), "'fp8' (block-scaled E4M3)")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise _bad("fmt", qc.get("fmt"), "'e4m3' (float8_e4m3fn)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise _bad("activation_scheme", qc.get("activation_scheme"), "'dynamic'")
    block = qc.get("weight_block_size")
    ok = isinstance(block, (list, tuple)) and len(block) == 2
    if not ok or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
        raise _bad("weight_block_size", block, "two positive integers, e.g. [128, 128]")
    return int(block[0]), int(block[1])


def check_fp8_tensors(
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str],
    block: tuple[int, int] | None,
) -> dict[str, tuple[int, ...]]:
    """Checks the FP8 weights and scales before any data is read; returns the other shapes.

    Every F8_E4M3 tensor must be a 2-D weight with a `weight_scale_inv` of shape
    [ceil(out / bo), ceil(in / bi)], and every scale_inv must belong to one. Errors name the
    tensors. The returned dict (scales left out) is what the bf16 checks expect.
    """
    for name, dtype in dtypes.items():
        if dtype.startswith("F8_") and dtype != FP8_SAFETENSORS:
            raise ValueError(f"tensor {name!r} is {dtype}; only {FP8_SAFETENSORS} is supported")
    weights = {name for name, dtype in dtypes.items() if dtype == FP8_SAFETENSORS}
    scales = {name for name in shapes if name.endswith(SCALE_SUFFIX)}
    for name in sorted(weights):
        if block is None:
            raise ValueError(
                f"tensor {name!r} is stored as {FP8_SAFETENSORS}, but config.json has no "
                "quantization_config giving its weight_block_size"
            )
        if len(shapes[name]) != 2:
            raise ValueError(f"tensor {name!r}: an {FP8_SAFETENSORS} tensor must be 2-D [out, in]")
        scale = scale_name(name)
        if scale not in shapes:
            raise ValueError(f"tensor {name!r} is {FP8_SAFETENSORS} but {scale!r} is missing")
        want = scale_shape(shapes[name], block)
        if tuple(shapes[scale]) != want:
            raise ValueError(
                f"tensor {scale!r} has shape {tuple(shapes[scale])}, expected {want} for "
                f"{name!r} {tuple(shapes[name])} in {block[0]}x{block[1]} blocks"
            )
    for scale in sorted(scales):
        weight = scale[: -len(SCALE_SUFFIX)]
        if weight not in weights:
            stored = dtypes.get(weight, "absent")
            raise ValueError(
                f"tensor {scale!r} scales {weight!r}, which is {stored}, not {FP8_SAFETENSORS}"
            )
    return {name: shape for name, shape in shapes.items() if name not in scales}


def dequantizing_getter(
    get_tensor: Callable[[str], np.ndarray],
    dtypes: Mapping[str, str],
    block: tuple[int, int] | None,
) -> Callable[[str], np.ndarray]:
    """`get_tensor` that returns each F8_E4M3 weight dequantized to float32 [out, in].

    Raises ValueError naming the scale tensor when a scale is not finite.
    """

    def get(name: str) -> np.ndarray:
        tensor = get_tensor(name)
        if dtypes.get(name) != FP8_SAFETENSORS:
            return tensor
        scale = np.asarray(get_tensor(scale_name(name)), np.float32)
        if not np.all(np.isfinite(scale)):
            raise ValueError(f"tensor {scale_name(name)!r} holds non-finite scales")
        return dequantize_block(tensor, scale, block)

    return get
