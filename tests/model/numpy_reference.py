"""A straightforward float64 numpy forward pass of Ling 2.0, written from SPEC section 4.

Loops over tokens, heads and experts on purpose: it is the ground truth the NNX model is
compared against, so it favours being obviously right over being fast.
"""

from __future__ import annotations

import math

import numpy as np


def rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(x, gate, up, down):
    return (silu(x @ gate) * (x @ up)) @ down


def inv_freq_and_mscale(cfg):
    rot = int(cfg.head_dim * cfg.rope.partial_rotary_factor)
    inv = np.array([cfg.rope.theta ** (-2.0 * i / rot) for i in range(rot // 2)])
    scaling = cfg.rope.scaling
    if scaling.type == "none":
        return inv, 1.0
    s, l0 = scaling.factor, scaling.original_max_position_embeddings

    def corr(n):
        return rot * math.log(l0 / (2 * math.pi * n)) / (2 * math.log(cfg.rope.theta))

    lo = max(math.floor(corr(scaling.beta_fast)), 0)
    hi = min(math.ceil(corr(scaling.beta_slow)), rot - 1)
    ramp = np.array([min(max((i - lo) / (hi - lo), 0.0), 1.0) for i in range(rot // 2)])
    mscale = scaling.mscale if scaling.mscale is not None else 0.1 * math.log(s) + 1.0
    return (inv / s) * ramp + inv * (1 - ramp), mscale


def rope_one(vec, pos, cfg):
    """Rotates one head vector [head_dim] at one position, pairing channels (i, i + rot/2)."""
    inv, mscale = inv_freq_and_mscale(cfg)
    rot = 2 * len(inv)
    half = rot // 2
    out = vec.copy()
    for i in range(half):
        c, s = math.cos(pos * inv[i]) * mscale, math.sin(pos * inv[i]) * mscale
        a, b = vec[i], vec[i + half]
        out[i] = a * c - b * s
        out[i + half] = b * c + a * s
    return out


def attention(x, p, cfg, positions, segments):
    """x: [seq, d] for one sequence."""
    seq = x.shape[0]
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = np.einsum("sd,dhk->shk", x, p["qkv"])
    q, k, v = qkv[:, :nh], qkv[:, nh : nh + nkv], qkv[:, nh + nkv :]
    if cfg.attention.use_qk_norm:
        q = rmsnorm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rmsnorm(k, p["k_norm"], cfg.rms_norm_eps)
    q = np.stack([[rope_one(q[t, h], positions[t], cfg) for h in range(nh)] for t in range(seq)])
    k = np.stack([[rope_one(k[t, h], positions[t], cfg) for h in range(nkv)] for t in range(seq)])
    out = np.zeros((seq, nh, hd))
    group = nh // nkv
    for h in range(nh):
        kv = h // group
        for t in range(seq):
            allowed = [u for u in range(t + 1) if segments[u] == segments[t]]
            scores = np.array([q[t, h] @ k[u, kv] / math.sqrt(hd) for u in allowed])
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            out[t, h] = sum(pr * v[u, kv] for pr, u in zip(probs, allowed, strict=True))
    return np.einsum("shk,hkd->sd", out, p["out"])


def route_one(logits, bias, moe):
    """Returns (experts [k], gate weights [k]) for one token, ties to the lower index."""
    if moe.score_function == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max())
        scores /= scores.sum()
    sel = scores + (bias if bias is not None else 0.0)
    num_experts = len(scores)
    per_group = num_experts // moe.n_group
    group_score = [
        sum(sorted(sel[g * per_group : (g + 1) * per_group], reverse=True)[: moe.group_score_topk])
        for g in range(moe.n_group)
    ]
    groups = sorted(range(moe.n_group), key=lambda g: (-group_score[g], g))[: moe.topk_group]
    candidates = [e for e in range(num_experts) if e // per_group in groups]
    experts = sorted(candidates, key=lambda e: (-sel[e], e))[: moe.num_experts_per_tok]
    gate = scores[experts]
    if moe.norm_topk_prob:
        gate = gate / (gate.sum() + 1e-20)
    return np.array(experts), gate * moe.routed_scaling_factor


def moe_ffn(x, p, cfg, token_mask=None):
    """x: [seq, d] -> ([seq, d], counts [E] over the tokens where token_mask is true)."""
    moe = cfg.moe
    out = np.zeros_like(x)
    counts = np.zeros(moe.num_experts)
    for t in range(x.shape[0]):
        logits = x[t] @ p["router"]
        experts, gate = route_one(logits, p.get("expert_bias"), moe)
        for e, w in zip(experts, gate, strict=True):
            out[t] += w * swiglu(
                x[t], p["experts_gate"][e], p["experts_up"][e], p["experts_down"][e]
            )
            counts[e] += 1 if token_mask is None else token_mask[t]
        if moe.num_shared_experts:
            out[t] += swiglu(x[t], p["shared_gate"], p["shared_up"], p["shared_down"])
    return out, counts


def block(h, p, cfg, positions, segments, use_moe, token_mask=None):
    eps = cfg.rms_norm_eps
    h = h + attention(rmsnorm(h, p["input_norm"], eps), p, cfg, positions, segments)
    x = rmsnorm(h, p["post_attention_norm"], eps)
    if use_moe:
        y, counts = moe_ffn(x, p, cfg, token_mask)
    else:
        y, counts = swiglu(x, p["gate"], p["up"], p["down"]), None
    return h + y, counts


def forward(params, cfg, input_ids, positions, segments):
    """One sequence. params: see `reference_params` in the tests. Returns dict of arrays.

    Router counts leave out padding (segment id 0), as the model's do.
    """
    token_mask = segments != 0
    h = params["embed"][input_ids]
    counts = []
    for i, layer in enumerate(params["layers"]):
        use_moe = i >= cfg.first_k_dense_replace
        h, c = block(h, layer, cfg, positions, segments, use_moe, token_mask)
        if c is not None:
            counts.append(c)
    h = rmsnorm(h, params["final_norm"], cfg.rms_norm_eps)
    result = {"logits": h @ params["lm_head"], "counts": np.array(counts)}
    if "mtp" in params:
        mtp = params["mtp"]
        shifted = np.concatenate([input_ids[1:], [0]])
        e = rmsnorm(params["embed"][shifted], mtp["embed_norm"], cfg.rms_norm_eps)
        hh = rmsnorm(h, mtp["hidden_norm"], cfg.rms_norm_eps)
        u = np.concatenate([e, hh], axis=-1) @ mtp["eh_proj"]
        u, c = block(u, mtp["block"], cfg, positions, segments, True, token_mask)
        u = rmsnorm(u, mtp["final_norm"], cfg.rms_norm_eps)
        result["mtp_logits"] = u @ params["lm_head"]
        result["mtp_counts"] = c
    return result
