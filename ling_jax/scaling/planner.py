"""Wind-tunnel planning: a compute budget -> model shape, tokens, LR and batch (SPEC 7.2, 7.3).

`plan(C)` follows the Ling Wind Tunnel recipe: the model's non-embedding FLOPs per token M
target M_opt(C) (or C / D for a fixed token count D), its MoE shape follows the activation
ratio A and granularity G asked for, and the LR and batch size follow eta_opt(C) and B_opt(C).
M is always that of the produced config, counted by `ling_jax.model.counting` at `seq_len`.

Shape heuristic (documented choices, not fitted laws):
  * Width tiers: head_dim is 128 from d_model = 1024 up (Ling 2.0's fixed 128), and below that
    max(16, d_model / 8) rounded down to a power of two, so small models keep >= 8 heads
    (2-15 heads of 16 below d_model = 256). `head_dim=` fixes it instead.
  * GQA: n_kv = the largest divisor of n_heads not above max(4, n_heads / 8), giving Ling's
    16/4, 32/4 and 64/8.
  * Depth: layers ~ d_model^(2/3) / 6.9, i.e. an aspect ratio d_model / L ~ 6.9 d_model^(1/3)
    that grows with width. It is the fit, with the exponent fixed, to the paper's ladder
    (8/384 ... 22/1280, d/L ~ 50-60), Dense-6.1B (28/4096) and Ling-mini/flash/1T (20/2048,
    32/4096, 80/8192), which it matches to within a factor 1.35. Among the widths whose
    best layer count puts M within `tolerance` of the target, the plan takes the one closest
    to this rule (in log L); if none does, the one with M closest to the target.
  * MoE from (A, G): d_expert = 2 d_model / G (rounded to a multiple of 64 from d_model = 1024,
    of 8 below); the active FFN width (top_k + shared) d_expert is `ffn_ratio` d_model, 2.25 by
    default as in all three Ling 2.0 sizes (9 x 512 / 2048); routed experts
    E = (top_k + shared) / A - shared, rounded to a multiple of 8. Routing uses Ling's 8 groups
    / top 4 groups where E allows it, else one group. Achieved A and G are reported.
  * Dense fraction: first_k_dense = max(1, floor(`dense_fraction` L)), at most L - 1;
    `dense_fraction` = 0.05 gives Ling's 1 / 1 / 4 dense layers at L = 20 / 32 / 80, and 3 of
    60 layers, matching the paper's optimum of 2-3 of 60 at 3e20 FLOPs. Dense layers use an
    FFN of `ffn_ratio` d_model, so they cost about as much as a MoE layer.
  * arch="dense": every layer is dense (first_k_dense = L) with an FFN of 3.5 d_model by default
    (the paper's Dense-6.1B, 14336 / 4096), no MTP; the unused `moe` fields keep their defaults.

The laws were fitted at 3e17-3e20 FLOPs; plans far outside (the CPU tunnel at 1e13-1e16) are
extrapolations, which is fine for comparing features against a baseline at equal compute.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from ling_jax.configs import base_model_config, set_fields, validate_model_config
from ling_jax.model import counting
from ling_jax.scaling import laws

LING_ACTIVATION_RATIO = 9 / 257
LING_GRANULARITY = 8.0
DEPTH_COEF = 6.9
MOE_FFN_RATIO = 2.25
DENSE_FFN_RATIO = 3.5
DENSE_FRACTION = 0.05
MAX_WIDTH = 65536


@dataclasses.dataclass(frozen=True)
class Plan:
    """One wind-tunnel run.

    Attributes:
      config: the validated model config.
      arch: "moe" or "dense".
      compute: the budget C in FLOPs.
      seq_len: the training sequence length (M depends on it).
      flops_per_token: M of `config` (non-embedding training FLOPs per token, counting.py).
      target_flops_per_token: M_opt(C), or C / tokens when the token count was given.
      tokens: training tokens D, a whole number of batches.
      learning_rate: peak LR, eta_opt(C).
      batch_tokens: B_opt(C) in tokens (before rounding to whole sequences).
      batch_size: sequences per batch, B_opt(C) / seq_len rounded (at least 1).
      train_steps: tokens / (batch_size seq_len).
      activation_ratio: achieved A (1 for dense).
      granularity: achieved G (None for dense).
      efficiency_leverage: EL(A, G, C) predicted by the joint law (1 for dense).
      params: the parameter count of `config`.
    """

    config: ml_collections.ConfigDict
    arch: str
    compute: float
    seq_len: int
    flops_per_token: int
    target_flops_per_token: float
    tokens: int
    learning_rate: float
    batch_tokens: float
    batch_size: int
    train_steps: int
    activation_ratio: float
    granularity: float | None
    efficiency_leverage: float
    params: counting.ParamCount

    @property
    def flops_per_token_error(self) -> float:
        """M / target - 1."""
        return self.flops_per_token / self.target_flops_per_token - 1.0

    @property
    def realized_compute(self) -> float:
        """M x tokens: the compute the plan actually spends."""
        return float(self.flops_per_token) * self.tokens

    def describe(self) -> str:
        """A one-line summary for logs."""
        c = self.config
        shape = f"d={c.hidden_size} L={c.num_layers} heads={c.num_attention_heads}/"
        shape += f"{c.num_kv_heads}x{c.head_dim}"
        if self.arch == "moe":
            m = c.moe
            shape += (
                f" E={m.num_experts} k={m.num_experts_per_tok}+{m.num_shared_experts}"
                f" d_e={m.expert_intermediate_size} dense={c.first_k_dense_replace}"
                f" (A={self.activation_ratio:.2%} G={self.granularity:.2f})"
            )
        else:
            shape += f" d_ffn={c.intermediate_size}"
        return (
            f"C={self.compute:.3g} {self.arch} {shape} M={self.flops_per_token:.3g}"
            f" ({self.flops_per_token_error:+.1%}) D={self.tokens:.3g}"
            f" lr={self.learning_rate:.3g} batch={self.batch_size}x{self.seq_len}"
            f" steps={self.train_steps} total={self.params.total:.3g}"
        )


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, multiple * round(x / multiple))


def _auto_head_dim(d_model: int) -> int:
    if d_model >= 1024:
        return 128
    return max(16, 2 ** math.floor(math.log2(d_model / 8)))


def _nice_heads(heads: int) -> bool:
    return heads in (1, 2) or heads % 4 == 0


def _candidate_widths(head_dim: int | None) -> Iterator[tuple[int, int]]:
    """(d_model, head_dim) pairs in increasing width, with 1, 2 or a multiple of 4 heads."""
    if head_dim is not None:
        for heads in range(1, MAX_WIDTH // head_dim + 1):
            if _nice_heads(heads):
                yield heads * head_dim, head_dim
        return
    for d in range(32, MAX_WIDTH + 1, 16):
        hd = _auto_head_dim(d)
        if d % hd == 0 and _nice_heads(d // hd):
            yield d, hd


def _kv_heads(heads: int) -> int:
    target = min(heads, max(4, heads // 8))
    return max(k for k in range(1, target + 1) if heads % k == 0)


def dense_layers(num_layers: int, arch: str, dense_fraction: float = DENSE_FRACTION) -> int:
    """The leading dense layers of a plan (module docstring: dense-fraction rule)."""
    if arch == "dense":
        return num_layers
    k = max(1, math.floor(dense_fraction * num_layers + 1e-9)) if dense_fraction > 0 else 0
    return min(k, num_layers - 1)


def _width_fields(
    d: int,
    head_dim: int,
    arch: str,
    activation_ratio: float,
    granularity: float,
    num_shared_experts: int,
    ffn_ratio: float,
) -> dict[str, Any]:
    """Every size field that depends on the width alone (dotted config keys)."""
    multiple = 64 if d >= 1024 else 8
    heads = d // head_dim
    fields: dict[str, Any] = {
        "hidden_size": d,
        "head_dim": head_dim,
        "num_attention_heads": heads,
        "num_kv_heads": _kv_heads(heads),
        "intermediate_size": _round_to(ffn_ratio * d, multiple),
    }
    if arch == "dense":
        return fields
    d_expert = _round_to(2 * d / granularity, multiple)
    active = max(num_shared_experts + 1, round(ffn_ratio * d / d_expert))
    top_k = active - num_shared_experts
    experts = active / activation_ratio - num_shared_experts
    experts = max(top_k, _round_to(experts, 8) if experts >= 16 else round(experts))
    per_group = experts // 8
    grouped = experts % 8 == 0 and per_group >= 2 and top_k <= 4 * per_group
    n_group, topk_group = (8, 4) if grouped else (1, 1)
    fields.update(
        {
            "moe.num_experts": experts,
            "moe.num_experts_per_tok": top_k,
            "moe.num_shared_experts": num_shared_experts,
            "moe.expert_intermediate_size": d_expert,
            "moe.shared_expert_intermediate_size": d_expert,
            "moe.n_group": n_group,
            "moe.topk_group": topk_group,
            "moe.group_score_topk": min(2, experts // n_group),
        }
    )
    return fields


def _best_depth(
    scratch: ml_collections.ConfigDict,
    target: float,
    seq_len: int,
    arch: str,
    dense_fraction: float,
) -> tuple[int, int]:
    """The layer count whose M is closest to `target` (log distance), and that M.

    M is affine in (L, first_k_dense): M = c0 + (L - k) m_moe + k m_dense; the three
    coefficients are read off `counting` at three small depths.
    """

    def flops(num_layers: int, k: int) -> int:
        scratch.num_layers, scratch.first_k_dense_replace = num_layers, k
        return counting.non_embedding_flops_per_token(scratch, seq_len)

    one_moe, two_moe, one_dense = flops(1, 0), flops(2, 0), flops(1, 1)
    m_moe, m_dense = two_moe - one_moe, one_dense - one_moe + (two_moe - one_moe)
    c0 = one_moe - m_moe

    def total(num_layers: int) -> int:
        k = dense_layers(num_layers, arch, dense_fraction)
        return c0 + (num_layers - k) * m_moe + k * m_dense

    share = 1.0 if arch == "dense" else dense_fraction
    estimate = max(1, int((target - c0) / ((1 - share) * m_moe + share * m_dense)))
    depths = range(max(1, estimate - 2), estimate + 3)
    best = min(depths, key=lambda n: abs(math.log(total(n) / target)))
    return best, total(best)


def _check_shape_args(
    activation_ratio: float, granularity: float, num_shared_experts: int, dense_fraction: float
) -> None:
    if not 0 < activation_ratio <= 1:
        raise ValueError(f"activation_ratio = {activation_ratio!r} is invalid: expected (0, 1]")
    if not granularity > 0:
        raise ValueError(f"granularity = {granularity!r} is invalid: expected > 0")
    if not (isinstance(num_shared_experts, int) and num_shared_experts >= 0):
        raise ValueError(f"num_shared_experts = {num_shared_experts!r}: expected an int >= 0")
    if not 0 <= dense_fraction < 1:
        raise ValueError(f"dense_fraction = {dense_fraction!r} is invalid: expected [0, 1)")


def _arch_defaults(arch: str, ffn_ratio: float | None, mtp: bool | None) -> tuple[float, bool]:
    if ffn_ratio is None:
        ffn_ratio = MOE_FFN_RATIO if arch == "moe" else DENSE_FFN_RATIO
    if mtp is None:
        mtp = arch == "moe"
    if mtp and arch == "dense":
        raise ValueError("mtp = True is invalid for arch = 'dense': the MTP block is a MoE block")
    return ffn_ratio, mtp


def plan(
    compute: float,
    *,
    activation_ratio: float = LING_ACTIVATION_RATIO,
    granularity: float = LING_GRANULARITY,
    num_shared_experts: int = 1,
    arch: str = "moe",
    seq_len: int = 4096,
    vocab_size: int = 157184,
    tokens: float | None = None,
    head_dim: int | None = None,
    ffn_ratio: float | None = None,
    dense_fraction: float = DENSE_FRACTION,
    depth_coef: float = DEPTH_COEF,
    mtp: bool | None = None,
    tolerance: float = 0.05,
    config_overrides: Mapping[str, Any] | None = None,
) -> Plan:
    """Plans one run of `compute` FLOPs (see the module docstring for the shape rules).

    Args:
      compute: the budget C in FLOPs.
      activation_ratio, granularity: the MoE shape asked for (defaults: Ling 2.0, 9/257 and 8).
      num_shared_experts: shared experts per MoE layer (Ling: 1, the paper's best above 1e20).
      arch: "moe" or "dense"; selects M_opt / D_opt.
      seq_len: training sequence length; M counts attention scores at this length.
      vocab_size: the vocabulary (embedding and head FLOPs are not part of M).
      tokens: a fixed token count D; the target M is then C / D (e.g. 20e12 for Ling 2.0's
        over-trained runs). None follows D_opt: D = C / M of the produced config.
      head_dim: fixes the head width; None picks 128 from d_model = 1024, smaller below.
      ffn_ratio: active FFN width / d_model (MoE default 2.25, dense default 3.5).
      dense_fraction: the share of leading dense layers in MoE plans.
      depth_coef: the depth rule L ~ d_model^(2/3) / depth_coef.
      mtp: keep one MTP layer (default: True for MoE, False for dense).
      tolerance: relative M error within which the width closest to the depth rule wins.
      config_overrides: dotted config keys set last (dtypes, rope); sizes should not change.

    Returns:
      A `Plan` with a validated config built on `base_model_config()`.
    """
    compute = float(laws._positive("compute", compute))
    laws._check_arch(arch)
    _check_shape_args(activation_ratio, granularity, num_shared_experts, dense_fraction)
    ffn_ratio, mtp = _arch_defaults(arch, ffn_ratio, mtp)
    if tokens is None:
        target = float(laws.optimal_model_flops_per_token(compute, arch))
    else:
        target = compute / float(laws._positive("tokens", tokens))

    scratch = base_model_config()
    candidates = []  # (fields, layers, M)
    for d, hd in _candidate_widths(head_dim):
        fields = _width_fields(
            d, hd, arch, activation_ratio, granularity, num_shared_experts, ffn_ratio
        )
        set_fields(scratch, fields)
        layers, flops = _best_depth(scratch, target, seq_len, arch, dense_fraction)
        if layers == 1 and flops > target * (1 + tolerance):
            break  # One layer of this width is already too much; wider is worse.
        candidates.append((fields, layers, flops))
    if not candidates:
        raise ValueError(
            f"compute = {compute:.3g} is too small: the narrowest one-layer model exceeds the "
            f"target M = {target:.3g} FLOPs/token (try a smaller seq_len or head_dim)"
        )

    def depth_miss(c: tuple[dict[str, Any], int, int]) -> float:
        rule = c[0]["hidden_size"] ** (2 / 3) / depth_coef
        return abs(math.log(c[1] / rule))

    def flops_miss(c: tuple[dict[str, Any], int, int]) -> float:
        return abs(math.log(c[2] / target))

    within = [c for c in candidates if flops_miss(c) <= math.log1p(tolerance)]
    fields, layers, _ = min(within, key=depth_miss) if within else min(candidates, key=flops_miss)

    cfg = _config(fields, layers, arch, dense_fraction, vocab_size, seq_len, mtp, config_overrides)
    return _plan_for(cfg, arch, compute, target, seq_len, tokens)


def _config(
    fields: Mapping[str, Any],
    num_layers: int,
    arch: str,
    dense_fraction: float,
    vocab_size: int,
    seq_len: int,
    mtp: bool,
    config_overrides: Mapping[str, Any] | None,
) -> ml_collections.ConfigDict:
    cfg = base_model_config()
    set_fields(cfg, fields)
    cfg.num_layers = num_layers
    cfg.first_k_dense_replace = dense_layers(num_layers, arch, dense_fraction)
    cfg.vocab_size = vocab_size
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, seq_len)
    cfg.mtp.num_layers = 1 if mtp else 0
    set_fields(cfg, config_overrides or {})
    return validate_model_config(cfg)


def _plan_for(
    cfg: ml_collections.ConfigDict,
    arch: str,
    compute: float,
    target: float,
    seq_len: int,
    tokens: float | None,
) -> Plan:
    """The Plan of a finished config: tokens (D_opt or given), LR, batch, achieved A, G, EL."""
    flops = counting.non_embedding_flops_per_token(cfg, seq_len)
    batch_tokens = float(laws.optimal_batch_tokens(compute))
    batch_size = max(1, round(batch_tokens / seq_len))
    wanted = compute / flops if tokens is None else float(tokens)
    steps = max(1, round(wanted / (batch_size * seq_len)))
    if arch == "moe":
        a, g = counting.activation_ratio(cfg), counting.granularity(cfg)
        el = float(laws.efficiency_leverage(a, g, compute))
    else:
        a, g, el = 1.0, None, 1.0
    return Plan(
        config=cfg,
        arch=arch,
        compute=compute,
        seq_len=seq_len,
        flops_per_token=flops,
        target_flops_per_token=target,
        tokens=steps * batch_size * seq_len,
        learning_rate=float(laws.optimal_lr(compute)),
        batch_tokens=batch_tokens,
        batch_size=batch_size,
        train_steps=steps,
        activation_ratio=a,
        granularity=g,
        efficiency_leverage=el,
        params=counting.count_params(cfg),
    )


def plan_shape(
    d_model: int,
    num_layers: int,
    *,
    head_dim: int,
    activation_ratio: float = LING_ACTIVATION_RATIO,
    granularity: float = LING_GRANULARITY,
    num_shared_experts: int = 1,
    arch: str = "moe",
    seq_len: int = 4096,
    vocab_size: int = 157184,
    ffn_ratio: float | None = None,
    dense_fraction: float = DENSE_FRACTION,
    mtp: bool | None = None,
    token_scale: float = 1.0,
    config_overrides: Mapping[str, Any] | None = None,
) -> Plan:
    """Plans a run of a model whose width and depth are given (a hand-spaced ladder rung).

    The MoE shape follows (A, G) as in `plan`. The budget is the one whose compute-optimal
    model has this model's M: C = M_opt^-1(M); the run trains D = token_scale x C / M tokens
    (token_scale = 1: the compute-optimal D_opt(C)) at eta_opt(C) and B_opt(C), and
    `Plan.compute` is the compute actually spent, M x D.
    """
    laws._check_arch(arch)
    _check_shape_args(activation_ratio, granularity, num_shared_experts, dense_fraction)
    if d_model % head_dim:
        raise ValueError(f"d_model = {d_model} is not a multiple of head_dim = {head_dim}")
    if not (isinstance(num_layers, int) and num_layers >= 1):
        raise ValueError(f"num_layers = {num_layers!r}: expected an int >= 1")
    if not token_scale > 0:
        raise ValueError(f"token_scale = {token_scale!r}: expected > 0")
    ffn_ratio, mtp = _arch_defaults(arch, ffn_ratio, mtp)
    fields = _width_fields(
        d_model, head_dim, arch, activation_ratio, granularity, num_shared_experts, ffn_ratio
    )
    cfg = _config(
        fields, num_layers, arch, dense_fraction, vocab_size, seq_len, mtp, config_overrides
    )
    flops = counting.non_embedding_flops_per_token(cfg, seq_len)
    optimal_compute = float(laws.compute_for_flops_per_token(flops, arch))
    tokens = token_scale * optimal_compute / flops
    return _plan_for(cfg, arch, flops * tokens, flops, seq_len, tokens)


def width_scaled_init_std(
    d_model: int, reference_std: float = 0.006, reference_width: int = 2048
) -> float:
    """`reference_std` x sqrt(reference_width / d_model): Ling's 0.006 at d = 2048, held at the
    same size relative to 1/sqrt(d) at other widths.

    A fixed 0.006 is far too small for the CPU ladder's d = 48-96 models (each layer shrinks
    its input ~20x): training then starts with a long escape from near zero whose length
    depends on the seed, and two seeds of one model ended 0.1-0.25 nats apart; with this
    rule (0.034 at d = 64) they ended 0.004 apart.
    """
    if not (isinstance(d_model, int) and d_model >= 1):
        raise ValueError(f"d_model = {d_model!r}: expected an int >= 1")
    return reference_std * math.sqrt(reference_width / d_model)


def cpu_overrides(seq_len: int) -> dict[str, Any]:
    """Model fields of the CPU wind tunnel: float32 compute, rope theta 1e4, positions = seq_len."""
    return {
        "dtype": "float32",
        "rope.theta": 10000.0,
        "max_position_embeddings": seq_len,
        "rope.scaling.original_max_position_embeddings": seq_len,
    }


def plan_cpu(compute: float, *, vocab_size: int = 512, seq_len: int = 256, **kwargs: Any) -> Plan:
    """A plan sized for the CPU wind tunnel (budgets of about 1e13-1e16 FLOPs).

    Short sequences keep the attention-score FLOPs from dominating M; the small vocabulary
    keeps the (uncounted) embedding and head cheap; widths below 256 get head_dim 16. The model
    runs in float32 with rope theta 10000 and max_position_embeddings = seq_len. Other keyword
    arguments go to `plan`.
    """
    overrides = cpu_overrides(seq_len)
    overrides.update(kwargs.pop("config_overrides", None) or {})
    return plan(
        compute, vocab_size=vocab_size, seq_len=seq_len, config_overrides=overrides, **kwargs
    )
