"""Parameter and FLOP accounting from a model config (SPEC sections 1, 2 and 7.1).

Pure integer arithmetic on the config: no arrays are built, so Ling-1T is counted instantly.
The parameter layout counted here is the one the NNX model holds (all linears bias-free):

  embedding       word embedding [V, d]
  attention       fused QKV [d, (n_h + 2 n_kv) * head_dim], output [n_h * head_dim, d] and the
                  per-head q/k RMSNorm weights [head_dim] (when `attention.use_qk_norm`)
  norms           per-layer input and post-attention RMSNorm [d], the final norm [d]
  dense_mlp       SwiGLU gate/up [d, d_ffn], down [d_ffn, d] of the first `first_k_dense_replace`
  router          [d, E] per MoE layer
  routed_experts  gate/up [E, d, d_e], down [E, d_e, d] per MoE layer
  shared_experts  one SwiGLU of width `num_shared_experts * shared_expert_intermediate_size`
  lm_head         untied output projection [d, V]
  mtp             the whole MTP layer: enorm, hnorm [d], eh_proj [2d, d], one decoder block
                  (attention + MoE), final norm [d]; it shares the embedding and the head

The fp32 expert bias [E] of each MoE layer (the MTP block included) is a buffer, not a trained
parameter: it is reported in `ParamCount.expert_bias` and left out of every other figure.

"Active" parameters are those a token uses: every non-expert parameter (router, embedding and
head included), the `num_experts_per_tok` routed experts it is sent to, and the shared experts.
"""

from __future__ import annotations

import dataclasses

import ml_collections

MODULES = (
    "embedding",
    "attention",
    "norms",
    "dense_mlp",
    "router",
    "routed_experts",
    "shared_experts",
    "lm_head",
    "mtp",
)


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Parameter counts of one config; every figure is an exact integer.

    Attributes:
      total: trained parameters (expert bias excluded).
      active: parameters used per token, embedding and lm head included.
      active_non_embedding: `active` minus the input embedding and the lm head (the `N` of the
        Ling scaling laws, SPEC section 7.1).
      expert_bias: fp32 expert-bias entries (one [E] buffer per MoE layer, MTP included).
      by_module: module name -> (total, active), in the order of `MODULES`; sums to
        (`total`, `active`).
      include_mtp: whether the MTP layer is counted.
    """

    total: int
    active: int
    active_non_embedding: int
    expert_bias: int
    by_module: dict[str, tuple[int, int]]
    include_mtp: bool


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs per token, split by part (see `flops_per_token` for the convention).

    Attributes:
      total: the sum of the parts below.
      matmul: 2 (forward) or 6 (training) x the active matmul parameters of the main trunk
        (attention projections, router, dense and expert FFNs; no norms, embedding or head).
      attention: the QK^T and PV products of the main trunk.
      lm_head: the output projection of the main model.
      mtp: the MTP layer: its eh_proj and block matmuls, its attention scores and its own pass
        through the shared lm head.
    """

    total: int
    matmul: int
    attention: int
    lm_head: int
    mtp: int


def _swiglu(d: int, width: int) -> int:
    """gate [d, width] + up [d, width] + down [width, d]."""
    return 3 * d * width


def _attention_params(cfg: ml_collections.ConfigDict) -> int:
    d, h = cfg.hidden_size, cfg.head_dim
    qkv = d * (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * h
    out = cfg.num_attention_heads * h * d
    qk_norm = 2 * h if cfg.attention.use_qk_norm else 0
    return qkv + out + qk_norm


def _moe_params(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, int]]:
    """(total, active) of one MoE FFN, by part."""
    d, moe = cfg.hidden_size, cfg.moe
    expert = _swiglu(d, moe.expert_intermediate_size)
    shared = _swiglu(d, moe.num_shared_experts * moe.shared_expert_intermediate_size)
    router = d * moe.num_experts
    return {
        "router": (router, router),
        "routed_experts": (moe.num_experts * expert, moe.num_experts_per_tok * expert),
        "shared_experts": (shared, shared),
    }


def _mtp_params(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """(total, active) of one MTP layer, embedding and head excluded (they are shared)."""
    d = cfg.hidden_size
    # enorm, hnorm, final norm, block input and post-attention norms; eh_proj; attention.
    dense_part = 5 * d + 2 * d * d + _attention_params(cfg)
    moe = _moe_params(cfg)
    return (
        dense_part + sum(t for t, _ in moe.values()),
        dense_part + sum(a for _, a in moe.values()),
    )


def num_moe_layers(cfg: ml_collections.ConfigDict) -> int:
    """MoE layers of the main trunk (the MTP block not included)."""
    return cfg.num_layers - cfg.first_k_dense_replace


def count_params(cfg: ml_collections.ConfigDict, include_mtp: bool = True) -> ParamCount:
    """Counts the trained parameters of `cfg`, total and active per token, by module.

    The published sizes exclude MTP (released checkpoints carry none): Ling-flash-2.0 with
    `include_mtp=False` gives 102,889,697,280 parameters and 7,936 expert-bias entries.
    """
    d, V = cfg.hidden_size, cfg.vocab_size
    L, k = cfg.num_layers, cfg.first_k_dense_replace
    n_moe = num_moe_layers(cfg)
    with_mtp = include_mtp and cfg.mtp.num_layers > 0

    def same(n: int) -> tuple[int, int]:
        return (n, n)

    moe = _moe_params(cfg)
    by_module: dict[str, tuple[int, int]] = {
        "embedding": same(V * d),
        "attention": same(L * _attention_params(cfg)),
        "norms": same(2 * L * d + d),
        "dense_mlp": same(k * _swiglu(d, cfg.intermediate_size)),
        "router": tuple(n_moe * x for x in moe["router"]),
        "routed_experts": tuple(n_moe * x for x in moe["routed_experts"]),
        "shared_experts": tuple(n_moe * x for x in moe["shared_experts"]),
        # A tied head reuses the embedding matrix: no parameters of its own.
        "lm_head": same(0 if cfg.tie_word_embeddings else d * V),
        "mtp": _mtp_params(cfg) if with_mtp else (0, 0),
    }
    assert tuple(by_module) == MODULES
    total = sum(t for t, _ in by_module.values())
    active = sum(a for _, a in by_module.values())
    bias_layers = (n_moe + (1 if with_mtp else 0)) if cfg.moe.use_expert_bias else 0
    return ParamCount(
        total=total,
        active=active,
        active_non_embedding=active - by_module["embedding"][1] - by_module["lm_head"][1],
        expert_bias=bias_layers * cfg.moe.num_experts,
        by_module=by_module,
        include_mtp=with_mtp,
    )


def activation_ratio(cfg: ml_collections.ConfigDict) -> float:
    """A = (E_a + E_s) / (E + E_s), SPEC section 7.1."""
    moe = cfg.moe
    return (moe.num_experts_per_tok + moe.num_shared_experts) / (
        moe.num_experts + moe.num_shared_experts
    )


def granularity(cfg: ml_collections.ConfigDict) -> float:
    """G = 2 d_model / d_expert, SPEC section 7.1."""
    return 2 * cfg.hidden_size / cfg.moe.expert_intermediate_size


def _check_seq_len(seq_len: int) -> None:
    if not (isinstance(seq_len, int) and seq_len > 0):
        raise ValueError(f"seq_len = {seq_len!r} is invalid: expected a positive integer")


def _attention_score_flops(cfg: ml_collections.ConfigDict, seq_len: int, causal: bool) -> int:
    """Forward FLOPs of QK^T and PV for one token in one layer."""
    flops = 2 * 2 * seq_len * cfg.num_attention_heads * cfg.head_dim
    return flops // 2 if causal else flops


def _matmul_params(cfg: ml_collections.ConfigDict, mtp_layer: bool) -> int:
    """Active matmul parameters of the trunk, or of the MTP layer; norms are not matmuls."""
    d, h = cfg.hidden_size, cfg.head_dim
    attention = d * (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * h
    attention += cfg.num_attention_heads * h * d
    moe_active = sum(a for _, a in _moe_params(cfg).values())
    if mtp_layer:
        return 2 * d * d + attention + moe_active
    dense = _swiglu(d, cfg.intermediate_size)
    n_moe = num_moe_layers(cfg)
    return cfg.num_layers * attention + cfg.first_k_dense_replace * dense + n_moe * moe_active


def flops_per_token(
    cfg: ml_collections.ConfigDict,
    seq_len: int,
    include_mtp: bool = True,
    training: bool = True,
    causal: bool = False,
) -> FlopCount:
    """FLOPs per token of a forward pass, or of a training step (forward + backward).

    Convention (the one used for MFU):
      * training FLOPs = 3 x forward FLOPs (the backward pass costs twice the forward);
      * a linear layer costs 2 FLOPs (one multiply-accumulate) per parameter it uses: the
        active parameters only, i.e. top-k routed experts, shared experts, router, attention
        projections and dense FFNs; RMSNorm and other elementwise work is not counted;
      * attention scores: QK^T and PV cost 2 * 2 * seq_len * n_h * head_dim per token per
        layer in the forward pass, counted over the full sequence (not halved for causal
        masking), as the Ling scaling-law paper counts it; `causal=True` halves it;
      * the embedding lookup is free; the lm head costs 2 * d * V forward;
      * the MTP layer (if `include_mtp` and the config has one) adds its eh_proj and block
        matmuls, its attention scores and a second pass through the shared lm head.
    """
    _check_seq_len(seq_len)
    mult = 3 if training else 1
    d, V = cfg.hidden_size, cfg.vocab_size
    head = 2 * d * V
    attention_layer = _attention_score_flops(cfg, seq_len, causal)
    matmul = mult * 2 * _matmul_params(cfg, mtp_layer=False)
    attention = mult * cfg.num_layers * attention_layer
    lm_head = mult * head
    mtp = 0
    if include_mtp and cfg.mtp.num_layers > 0:
        mtp = mult * (2 * _matmul_params(cfg, mtp_layer=True) + attention_layer + head)
    return FlopCount(
        total=matmul + attention + lm_head + mtp,
        matmul=matmul,
        attention=attention,
        lm_head=lm_head,
        mtp=mtp,
    )


def non_embedding_flops_per_token(cfg: ml_collections.ConfigDict, seq_len: int) -> int:
    """The scaling-law compute per token M = 6 N + 12 s (n_h head_dim) L (SPEC sections 2, 7.1).

    N is the active non-embedding parameter count without MTP (norm weights included, as in
    the paper); the lm head and MTP are left out. SPEC section 2 writes head_dim as 128, which
    all Ling 2.0 sizes use. At s = 4096 this gives about 6.75e9 (mini), 3.56e10 (flash) and
    3.23e11 (1T).
    """
    _check_seq_len(seq_len)
    n = count_params(cfg, include_mtp=False).active_non_embedding
    attention_width = cfg.num_attention_heads * cfg.head_dim
    return 6 * n + 12 * seq_len * attention_width * cfg.num_layers
