"""The model configuration: one nested `ml_collections.ConfigDict`, the single source of truth.

Every behaviour of the model comes from an explicit field here; nothing dispatches on a model's
name. Field names follow the Hugging Face `BailingMoeV2Config` where one exists, so that
`ling_jax.convert.hf` can map `config.json` onto this structure one key at a time.

Sections:
  (top level)  sizes of the transformer trunk, dtypes, init, layer stacking.
  rope         partial rotary embedding and its optional YaRN scaling.
  attention    QK-norm and the attention implementation.
  moe          routed/shared experts, router, grouped-matmul backend.
  mtp          multi-token-prediction layers.
  fp8          FP8 (E4M3) training of the linear layers (SPEC section 9) and its monitoring.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

SCORE_FUNCTIONS = ("sigmoid", "softmax")
MOE_BACKENDS = ("xla", "ragged_dot", "pallas")
EP_DISPATCH = ("ragged", "dense")
ROPE_SCALING_TYPES = ("none", "yarn")
ATTENTION_IMPLS = ("xla", "chunked")
REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16", "float16")
FP8_MODES = ("auto", "native", "emulated")
FP8_WGRAD = ("fp8", "input")


def base_model_config() -> ml_collections.ConfigDict:
    """Defaults shared by the Ling 2.0 family (SPEC section 1); sizes are filled in by presets."""
    cfg = ml_collections.ConfigDict()
    # Trunk sizes.
    cfg.vocab_size = 157184
    cfg.hidden_size = 2048
    cfg.num_layers = 20
    cfg.num_attention_heads = 16
    cfg.num_kv_heads = 4
    cfg.head_dim = 128
    cfg.intermediate_size = 5120  # Dense SwiGLU width of the first `first_k_dense_replace` layers.
    cfg.first_k_dense_replace = 1
    cfg.rms_norm_eps = 1e-6
    cfg.max_position_embeddings = 32768
    cfg.tie_word_embeddings = False
    # Numerics and initialisation.
    cfg.dtype = "bfloat16"  # Activation / matmul dtype.
    cfg.param_dtype = (
        "float32"  # Storage dtype of trained parameters (the expert bias is always fp32).
    )
    cfg.init_std = 0.006
    # Layer stacking: scanned layers keep compile time flat in depth.
    cfg.scan_layers = True
    cfg.remat = "none"

    cfg.rope = ml_collections.ConfigDict()
    cfg.rope.theta = 600000.0
    cfg.rope.partial_rotary_factor = 0.5
    cfg.rope.scaling = ml_collections.ConfigDict()
    cfg.rope.scaling.type = "none"
    cfg.rope.scaling.factor = 4.0
    cfg.rope.scaling.original_max_position_embeddings = 32768
    cfg.rope.scaling.beta_fast = 32.0
    cfg.rope.scaling.beta_slow = 1.0
    # Attention-logit temperature; None means YaRN's 0.1 * ln(factor) + 1.
    cfg.rope.scaling.mscale = config_dict.placeholder(float)

    cfg.attention = ml_collections.ConfigDict()
    cfg.attention.use_qk_norm = True
    # "xla": one fp32 [seq, seq] score matrix per head; "chunked": online softmax over
    # chunk_size x chunk_size tiles (ling_jax.model.chunked_attention), no [seq, seq] matrix,
    # for 32K training and 128K prefill. Same values and gradients.
    cfg.attention.impl = "xla"
    cfg.attention.chunk_size = 512  # Tokens per query / key chunk of the "chunked" impl.

    cfg.moe = ml_collections.ConfigDict()
    cfg.moe.num_experts = 256
    cfg.moe.num_experts_per_tok = 8
    cfg.moe.num_shared_experts = 1
    cfg.moe.expert_intermediate_size = 512
    cfg.moe.shared_expert_intermediate_size = 512  # Per shared expert.
    cfg.moe.n_group = 8
    cfg.moe.topk_group = 4
    cfg.moe.group_score_topk = 2  # Groups are ranked by the sum of their top-2 biased scores.
    cfg.moe.score_function = "sigmoid"
    cfg.moe.norm_topk_prob = True
    cfg.moe.routed_scaling_factor = 2.5
    cfg.moe.use_expert_bias = True
    cfg.moe.backend = "xla"
    # Rows per tile of the XLA grouped-matmul backend; 0 chooses one from the shapes.
    cfg.moe.xla_tile_rows = 0
    # How tokens travel to their experts' devices over the `expert` mesh axis (used only when
    # that axis is > 1; ling_jax.model.moe.expert_parallel): "ragged" sends only the routed
    # rows (ragged all-to-all) and the expert matmuls cost what the received rows need;
    # "dense" sends a fixed worst-case buffer (EP x the bytes). Same values and gradients.
    cfg.moe.ep_dispatch = "ragged"

    cfg.mtp = ml_collections.ConfigDict()
    cfg.mtp.num_layers = 1
    cfg.mtp.loss_weight = 0.1

    # FP8 training (SPEC section 9, TransformerEngine's blockwise recipe): the GEMMs of the QKV
    # and output projections, dense MLPs, routed and shared experts run on E4M3 operands with
    # fp32 scales per 1 x 128 tile (activations, gradients) and 128 x 128 block (weights), fp32
    # accumulation and outputs in `dtype`. Router, expert bias, embeddings, head, norms, softmax
    # and the MTP projection stay in higher precision. Changes how the model runs, not its
    # parameters: snapshots resume and merge across this section (ling_jax.model.fp8).
    cfg.fp8 = ml_collections.ConfigDict()
    cfg.fp8.enabled = False
    # "native": E4M3 operands into the matmuls (the hardware's FP8 GEMMs: H100, TPU v7);
    # "emulated": quantize -> dequantize, then fp32 matmuls (same numerics, any backend);
    # "auto": native on GPUs of compute capability >= 8.9 and on TPU v7, emulated elsewhere.
    # Routed experts run natively only through the Pallas kernel (moe.backend = "pallas").
    cfg.fp8.mode = "auto"
    # Round every scale up to a power of two (x / scale is then exact; TE's default is False).
    cfg.fp8.power_of_two_scale = False
    # The weight-gradient GEMM: "fp8" (both operands 1 x 128 along the tokens, as TE does) or
    # "input" (in the compute dtype, like `pallas_kernels.fp8.gmm_fp8`; dL/dW is a leaf).
    cfg.fp8.wgrad = "fp8"
    # Safeguards (trainer): every this many steps, per FP8 op and layer, the underflow fraction
    # (non-zero elements that quantize to zero) and distortion (cosine similarity of a tensor
    # with its quantize -> dequantize round trip) of the op's input and weight, written as
    # fp8/underflow/layer_03/attn_qkv/input etc. 0 disables the probe.
    cfg.fp8.monitor_every_steps = 100
    cfg.fp8.underflow_warn = 1e-3  # Warn when an underflow fraction exceeds this.
    cfg.fp8.distortion_warn = 0.99  # Warn when a cosine similarity falls below this.
    return cfg


def _fail(field: str, value, expected: str) -> None:
    raise ValueError(f"model config field `{field}` = {value!r} is invalid: expected {expected}")


def _check_choice(cfg: ml_collections.ConfigDict, field: str, choices: tuple[str, ...]) -> None:
    value = cfg
    for part in field.split("."):
        value = value[part]
    if value not in choices:
        _fail(field, value, f"one of {choices}")


def _check_positive(cfg: ml_collections.ConfigDict, fields: tuple[str, ...]) -> None:
    for field in fields:
        value = cfg
        for part in field.split("."):
            value = value[part]
        if not value > 0:
            _fail(field, value, "a positive number")


def validate_model_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a model config once, naming the offending field; returns it unchanged."""
    _check_positive(
        cfg,
        (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "rms_norm_eps",
            "init_std",
            "rope.theta",
            "moe.num_experts",
            "moe.num_experts_per_tok",
            "moe.expert_intermediate_size",
            "moe.n_group",
            "moe.topk_group",
            "moe.group_score_topk",
            "attention.chunk_size",
        ),
    )
    _check_choice(cfg, "dtype", DTYPES)
    _check_choice(cfg, "param_dtype", DTYPES)
    _check_choice(cfg, "remat", REMAT_POLICIES)
    _check_choice(cfg, "rope.scaling.type", ROPE_SCALING_TYPES)
    _check_choice(cfg, "attention.impl", ATTENTION_IMPLS)
    _check_choice(cfg, "moe.score_function", SCORE_FUNCTIONS)
    _check_choice(cfg, "moe.backend", MOE_BACKENDS)
    if "ep_dispatch" in cfg.moe:  # Configs written before the field existed: "dense".
        _check_choice(cfg, "moe.ep_dispatch", EP_DISPATCH)
    if cfg.tie_word_embeddings:
        _fail("tie_word_embeddings", True, "False (Ling 2.0 unties embedding and head)")
    if cfg.num_attention_heads % cfg.num_kv_heads:
        _fail(
            "num_kv_heads",
            cfg.num_kv_heads,
            f"a divisor of num_attention_heads={cfg.num_attention_heads}",
        )
    rotary_dim = int(cfg.head_dim * cfg.rope.partial_rotary_factor)
    if not (0 < cfg.rope.partial_rotary_factor <= 1) or rotary_dim % 2:
        _fail(
            "rope.partial_rotary_factor",
            cfg.rope.partial_rotary_factor,
            f"a fraction in (0, 1] giving an even rotary width of head_dim={cfg.head_dim}",
        )
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_layers:
        _fail("first_k_dense_replace", cfg.first_k_dense_replace, f"in [0, {cfg.num_layers}]")
    if cfg.first_k_dense_replace and not cfg.intermediate_size > 0:
        _fail("intermediate_size", cfg.intermediate_size, "positive when dense layers exist")
    moe = cfg.moe
    if moe.num_experts_per_tok > moe.num_experts:
        _fail("moe.num_experts_per_tok", moe.num_experts_per_tok, f"<= {moe.num_experts}")
    if moe.num_experts % moe.n_group:
        _fail("moe.n_group", moe.n_group, f"a divisor of moe.num_experts={moe.num_experts}")
    if moe.topk_group > moe.n_group:
        _fail("moe.topk_group", moe.topk_group, f"<= moe.n_group={moe.n_group}")
    experts_per_group = moe.num_experts // moe.n_group
    if moe.group_score_topk > experts_per_group:
        _fail("moe.group_score_topk", moe.group_score_topk, f"<= {experts_per_group}")
    if moe.num_experts_per_tok > moe.topk_group * experts_per_group:
        _fail(
            "moe.num_experts_per_tok",
            moe.num_experts_per_tok,
            f"<= topk_group * experts per group = {moe.topk_group * experts_per_group}",
        )
    if moe.num_shared_experts < 0:
        _fail("moe.num_shared_experts", moe.num_shared_experts, ">= 0")
    if moe.num_shared_experts and not moe.shared_expert_intermediate_size > 0:
        _fail(
            "moe.shared_expert_intermediate_size",
            moe.shared_expert_intermediate_size,
            "positive when shared experts exist",
        )
    if moe.xla_tile_rows < 0:
        _fail("moe.xla_tile_rows", moe.xla_tile_rows, ">= 0 (0 picks a tile from the shapes)")
    if cfg.mtp.num_layers not in (0, 1):
        _fail("mtp.num_layers", cfg.mtp.num_layers, "0 or 1")
    if cfg.mtp.loss_weight < 0:
        _fail("mtp.loss_weight", cfg.mtp.loss_weight, ">= 0")
    _validate_fp8(cfg)
    if cfg.rope.scaling.type == "yarn":
        _check_positive(
            cfg, ("rope.scaling.factor", "rope.scaling.original_max_position_embeddings")
        )
    return cfg


def _validate_fp8(cfg: ml_collections.ConfigDict) -> None:
    if "fp8" not in cfg:  # Configs written before the section existed: FP8 off.
        return
    _check_choice(cfg, "fp8.mode", FP8_MODES)
    _check_choice(cfg, "fp8.wgrad", FP8_WGRAD)
    for field in ("enabled", "power_of_two_scale"):
        if not isinstance(cfg.fp8[field], bool):
            _fail(f"fp8.{field}", cfg.fp8[field], "True or False")
    if cfg.fp8.monitor_every_steps < 0:
        _fail("fp8.monitor_every_steps", cfg.fp8.monitor_every_steps, ">= 0 (0 disables)")
    if not 0 <= cfg.fp8.underflow_warn <= 1:
        _fail("fp8.underflow_warn", cfg.fp8.underflow_warn, "a fraction in [0, 1]")
    if not -1 <= cfg.fp8.distortion_warn <= 1:
        _fail("fp8.distortion_warn", cfg.fp8.distortion_warn, "a cosine similarity in [-1, 1]")
