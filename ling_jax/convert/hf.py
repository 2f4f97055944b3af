"""Hugging Face safetensors import/export of `LingForCausalLM` (HF `BailingMoeV2ForCausalLM`).

Both directions stream: loading builds the model abstractly (`nnx.eval_shape`) and fills each
parameter from tensors read one at a time; saving writes each shard tensor by tensor, so host
memory stays near one copy of the model plus one parameter. The tensor layout is in
`hf_layout`, the `config.json` mapping in `hf_config`.

FP8 checkpoints in the released format (E4M3 linears with 128 x 128 `weight_scale_inv` blocks, see
`hf_fp8`) are written with `fp8=True` / `--fp8` and dequantized on load.

Usage:
  python -m ling_jax.convert.hf export --workdir=RUN --output=DIR [--step=N] [--tokenizer=PATH]
      [--dtype=bfloat16] [--fp8] [--remote_code=DIR]   # a run's snapshot and its tokenizer
  python -m ling_jax.convert.hf export --preset=tiny --output=DIR [--seed=0] [--dtype=bfloat16]
      [--fp8]                                          # a randomly initialised preset
  python -m ling_jax.convert.hf inspect --hf_dir=DIR
  python -m ling_jax.convert.hf roundtrip --hf_dir=DIR --output=DIR2 [--fp8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ling_jax.configs.model_config import validate_model_config
from ling_jax.configs.presets import PRESETS, get_preset
from ling_jax.convert.hf_config import config_from_hf, config_to_hf
from ling_jax.convert.hf_fp8 import (
    QUANTIZATION_CONFIG,
    SCALE_SUFFIX,
    block_from_hf,
    check_fp8_tensors,
    dequantizing_getter,
    fp8_specs,
    fp8_tensors,
    is_quantized,
)
from ling_jax.convert.hf_io import (
    CONFIG_FILE,
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    CheckpointReader,
    first_names,
    plan_shards,
    prepare_output,
    read_hf_config,
    write_safetensors,
)
from ling_jax.convert.hf_layout import (
    hf_tensor_shapes,
    hf_tensor_specs,
    hf_tensors_from_state,
    state_from_hf_tensors,
)
from ling_jax.io import paths
from ling_jax.model import LingForCausalLM, count_params

__all__ = [
    "config_from_hf",
    "config_to_hf",
    "hf_tensor_shapes",
    "hf_tensors_from_state",
    "load_hf_state",
    "load_pretrained",
    "pretrained_config",
    "save_hf_state",
    "save_pretrained",
    "state_from_hf_tensors",
]


def _apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    for dotted, value in overrides.items():
        *sections, name = dotted.split(".")
        node = cfg
        for section in sections:
            if section not in node or not isinstance(node[section], ml_collections.ConfigDict):
                raise ValueError(f"config override {dotted!r}: no config section {section!r}")
            node = node[section]
        if name not in node:
            raise ValueError(f"config override {dotted!r}: no config field {name!r}")
        node[name] = value


def pretrained_config(
    path: str | os.PathLike,
    dtype: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """The model config of an HF checkpoint directory, with `dtype` and dotted overrides.

    `dtype` sets both `param_dtype` and the compute `dtype`; None uses the checkpoint's
    `torch_dtype` (bfloat16 when absent). `config_overrides` maps dotted fields to values,
    e.g. {"moe.backend": "ragged_dot", "mtp.num_layers": 0} (the latter drops a stored MTP layer).
    """
    hf = read_hf_config(path)
    try:
        cfg = config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: {e}") from e
    if dtype is None:
        dtype = hf.get("torch_dtype", hf.get("dtype")) or "bfloat16"
    cfg.param_dtype = cfg.dtype = dtype
    _apply_overrides(cfg, config_overrides or {})
    return validate_model_config(cfg)


def _check_tensors(
    found: Mapping[str, tuple[int, ...]],
    config: ml_collections.ConfigDict,
    path: Path,
    drop_mtp: bool = False,
) -> None:
    """Validates names and shapes before any data is read; errors name the tensors."""
    expected = hf_tensor_shapes(config)
    unknown = set(found) - set(expected)
    if drop_mtp:
        prefix = f"model.layers.{config.num_layers}."
        unknown = {name for name in unknown if not name.startswith(prefix)}
    if unknown:
        raise ValueError(
            f"{path}: tensor(s) not in the model for this config: {first_names(unknown)}"
        )
    missing = set(expected) - set(found)
    if missing:
        hint = ""
        if config.mtp.num_layers and all(f".{config.num_layers}." in n for n in missing):
            hint = "; the MTP layer is absent: load with config_overrides={'mtp.num_layers': 0}"
        raise ValueError(f"{path}: missing tensor(s) {first_names(missing)}{hint}")
    for name, shape in expected.items():
        if found[name] != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {found[name]}, expected {shape}")


def load_hf_state(
    path: str | os.PathLike,
    config: ml_collections.ConfigDict,
    abstract_state: nnx.State | None = None,
    put: Callable[[tuple[str, ...], np.ndarray], jax.Array] | None = None,
    drop_mtp: bool = False,
) -> nnx.State:
    """The state of `LingForCausalLM(config)` read from the safetensors files in `path`.

    Names and shapes are all checked before any data is read. `put` places each leaf (see
    `state_from_hf_tensors`); `abstract_state` defaults to that of an abstract model.
    `drop_mtp` ignores a stored MTP layer (layer index num_layers) when `config` has none.
    FP8 weights (F8_E4M3 + `weight_scale_inv`, with the block size of config.json's
    `quantization_config`) are dequantized in float32, then cast to the leaf's dtype.
    """
    path = Path(paths.local_folder(os.fspath(path)))  # A gs:// folder is read from a copy.
    if abstract_state is None:
        _, abstract_state = nnx.split(_abstract_model(config))
    block = None
    if (path / CONFIG_FILE).is_file():
        try:
            block = block_from_hf(read_hf_config(path))
        except ValueError as e:
            raise ValueError(f"{path / CONFIG_FILE}: {e}") from e
    with CheckpointReader(path) as checkpoint:
        dtypes = checkpoint.dtypes()
        try:
            shapes = check_fp8_tensors(checkpoint.shapes(), dtypes, block)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        _check_tensors(shapes, config, path, drop_mtp)
        get_tensor = dequantizing_getter(checkpoint.get, dtypes, block)
        return state_from_hf_tensors(get_tensor, config, abstract_state, put)


def _abstract_model(config: ml_collections.ConfigDict) -> LingForCausalLM:
    return nnx.eval_shape(lambda: LingForCausalLM(config, rngs=nnx.Rngs(0)))


def load_pretrained(
    path: str | os.PathLike,
    dtype: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> LingForCausalLM:
    """Loads an HF BailingMoeV2 checkpoint directory (config.json + safetensors).

    `dtype` ("bfloat16", "float32", ...) is the parameter and compute dtype (None: the stored
    `torch_dtype`); the expert bias stays float32. A checkpoint whose config has no MTP layer
    gives a model without one. See `pretrained_config` for `config_overrides`.
    """
    config = pretrained_config(path, dtype, config_overrides)
    graphdef, abstract_state = nnx.split(_abstract_model(config))
    # An override of mtp.num_layers to 0 drops the MTP layer the checkpoint stores.
    stored_mtp = read_hf_config(path).get("num_nextn_predict_layers") or 0
    drop_mtp = stored_mtp > config.mtp.num_layers
    return nnx.merge(graphdef, load_hf_state(path, config, abstract_state, drop_mtp=drop_mtp))


def save_hf_state(
    state: Any,
    config: ml_collections.ConfigDict,
    path: str | os.PathLike,
    max_shard_bytes: int = 5 * 2**30,
    dtype: str | None = None,
    overwrite: bool = False,
    fp8: bool = False,
) -> None:
    """Writes `state` (an `nnx.State` or nested dict of arrays) as an HF checkpoint directory.

    Files: config.json, model-0000i-of-0000N.safetensors and model.safetensors.index.json
    (metadata.total_size, weight_map). `dtype` casts every tensor but the float32 expert bias
    (None keeps the state's dtypes). A non-empty `path` needs `overwrite=True`, which replaces
    config.json and earlier weight files only.

    `fp8=True` writes the released FP8 format (`hf_fp8`): the decoder linears as E4M3 with
    float32 `weight_scale_inv` per 128 x 128 block, quantized from the state's own values, the
    other tensors in `dtype` (default bfloat16, as released), and `quantization_config` in
    config.json. A gs:// `path` is written locally first, then uploaded.
    """
    if paths.is_remote(os.fspath(path)):
        prepare_output(path, overwrite)
        with paths.staged_folder(os.fspath(path)) as staging:
            save_hf_state(state, config, staging, max_shard_bytes, dtype, overwrite, fp8)
        return
    path = Path(path)
    if dtype is not None and jnp.dtype(dtype).itemsize == 1:
        raise ValueError(f"dtype {dtype!r} would cast every tensor: pass fp8=True instead")
    if fp8 and dtype is None:
        dtype = "bfloat16"
    specs = hf_tensor_specs(state, config, dtype)
    for name, _, spec_dtype in specs:
        if spec_dtype.name not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {spec_dtype} has no safetensors writer here")
    if fp8:
        tensors = fp8_tensors(_cast_unquantized(hf_tensors_from_state(state, config), specs))
        specs = fp8_specs(specs)
    else:
        tensors = hf_tensors_from_state(state, config, dtype)
    prepare_output(path, overwrite)
    shards = plan_shards(specs, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(path / file, shard, tensors)
        weight_map |= {name: file for name, _, _ in shard}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf_config = config_to_hf(config, dtype or config.param_dtype)
    if fp8:
        hf_config["quantization_config"] = json.loads(json.dumps(QUANTIZATION_CONFIG))
    (path / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")


def _cast_unquantized(
    tensors: Iterator[tuple[str, np.ndarray]], specs: Sequence[tuple[str, tuple, np.dtype]]
) -> Iterator[tuple[str, np.ndarray]]:
    """Casts each tensor to its spec's dtype but those to be quantized, which keep theirs."""
    dtypes = {name: dtype for name, _, dtype in specs}
    for name, tensor in tensors:
        yield name, tensor if is_quantized(name) else tensor.astype(dtypes[name], copy=False)


def save_pretrained(
    model: LingForCausalLM,
    path: str | os.PathLike,
    max_shard_bytes: int = 5 * 2**30,
    dtype: str | None = None,
    overwrite: bool = False,
    fp8: bool = False,
) -> None:
    """Saves `model` as an HF BailingMoeV2 checkpoint directory (see `save_hf_state`)."""
    save_hf_state(nnx.state(model), model.config, path, max_shard_bytes, dtype, overwrite, fp8)


def _storage_summary(path: str | os.PathLike) -> str:
    """The stored dtypes of a checkpoint and its quantization_config, from the headers."""
    with CheckpointReader(path) as checkpoint:
        dtypes = checkpoint.dtypes()
    scales = [name for name in dtypes if name.endswith(SCALE_SUFFIX)]
    counts = Counter(dtype for name, dtype in dtypes.items() if not name.endswith(SCALE_SUFFIX))
    stored = ", ".join(f"{n} {dtype}" for dtype, n in sorted(counts.items()))
    if scales:
        stored += f" (+{len(scales)} weight_scale_inv, dequantized on load)"
    lines = [f"stored tensors: {stored}"]
    quantization = read_hf_config(path).get("quantization_config")
    if quantization is not None:
        lines.append(f"quantization_config: {json.dumps(quantization, sort_keys=True)}")
    return "\n".join(lines)


def _summary(model: LingForCausalLM) -> str:
    cfg = model.config
    params = count_params(cfg)
    lines = [
        f"layers {cfg.num_layers} ({cfg.first_k_dense_replace} dense), d_model {cfg.hidden_size}, "
        f"heads {cfg.num_attention_heads}/{cfg.num_kv_heads} x {cfg.head_dim}, "
        f"vocab {cfg.vocab_size}",
        f"experts {cfg.moe.num_experts} (top-{cfg.moe.num_experts_per_tok}, "
        f"{cfg.moe.num_shared_experts} shared) x {cfg.moe.expert_intermediate_size}, "
        f"mtp layers {cfg.mtp.num_layers}, rope {cfg.rope.scaling.type}, "
        f"param dtype {cfg.param_dtype}",
        f"parameters {params.total:,} total, {params.active:,} active, "
        f"{params.expert_bias:,} expert-bias entries",
    ]
    values = dict(nnx.to_flat_state(nnx.state(model)))
    shown = [("embed",), ("lm_head",), ("final_norm", "scale")]
    moe = ("moe_layers", "blocks", "ffn")
    shown += [
        moe + ("router", "kernel"),
        moe + ("router", "expert_bias"),
        moe + ("experts", "gate"),
    ]
    for path in shown:
        if path in values:
            value = np.asarray(values[path].get_value(), np.float32)
            lines.append(f"  |{'.'.join(path)}| = {np.linalg.norm(value):.6g}  {value.shape}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ling_jax.convert.hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="save a run's snapshot with its tokenizer, or a random preset"
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="an experiments.run workdir")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a random model")
    export.add_argument("--output", required=True)
    export.add_argument("--step", type=int, default=None, help="snapshot (default: latest)")
    export.add_argument(
        "--tokenizer", default="", help="tokenizer.json (default: <workdir>/tokenizer/)"
    )
    export.add_argument(
        "--remote_code", default="", help="folder with the BailingMoeV2 remote-code files"
    )
    export.add_argument("--seed", type=int, default=0, help="--preset's initialisation")
    export.add_argument(
        "--dtype", default=None, help="weights dtype (default: bfloat16 for --preset, else stored)"
    )
    inspect = commands.add_parser("inspect", help="load a checkpoint and summarise it")
    inspect.add_argument("--hf_dir", required=True)
    roundtrip = commands.add_parser("roundtrip", help="load a checkpoint and save it again")
    roundtrip.add_argument("--hf_dir", required=True)
    roundtrip.add_argument("--output", required=True)
    for command in (export, roundtrip):
        command.add_argument("--max_shard_bytes", type=int, default=5 * 2**30)
        command.add_argument("--overwrite", action="store_true")
        command.add_argument(
            "--fp8", action="store_true", help="write the released FP8 format (E4M3 + scale_inv)"
        )
    args = parser.parse_args(argv)
    if args.command == "export" and args.preset and (args.step is not None or args.tokenizer):
        parser.error("--step and --tokenizer export a run: give them with --workdir")

    if args.command == "export" and args.workdir:
        from ling_jax.convert.hf_export import export_workdir  # It imports this module.

        step = export_workdir(
            args.workdir,
            args.output,
            step=args.step,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_bytes,
            overwrite=args.overwrite,
            fp8=args.fp8,
            remote_code=args.remote_code,
        )
        print(f"wrote snapshot {step} of {args.workdir} and its tokenizer to {args.output}")
    elif args.command == "export":
        cfg = get_preset(args.preset)
        cfg.param_dtype = args.dtype = args.dtype or "bfloat16"
        # One compiled initialisation is much faster than running it op by op.
        model = nnx.jit(lambda: LingForCausalLM(cfg, rngs=nnx.Rngs(args.seed)))()
        save_pretrained(
            model, args.output, args.max_shard_bytes, overwrite=args.overwrite, fp8=args.fp8
        )
        if args.remote_code:
            from ling_jax.convert.hf_export import add_remote_code

            add_remote_code(args.output, args.remote_code)
        fp8 = ", fp8" if args.fp8 else ""
        print(f"wrote {args.preset} (seed {args.seed}, {args.dtype}{fp8}) to {args.output}")
    elif args.command == "inspect":
        print(_summary(load_pretrained(args.hf_dir)))  # loads in the stored dtype
        print(_storage_summary(args.hf_dir))
    else:
        model = load_pretrained(args.hf_dir)
        save_pretrained(
            model, args.output, args.max_shard_bytes, overwrite=args.overwrite, fp8=args.fp8
        )
        print(f"loaded {args.hf_dir} and saved it to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
