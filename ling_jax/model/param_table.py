"""Prints a model preset's parameter table: counts by module, ratios and FLOPs per token.

Usage:
  python -m ling_jax.model.param_table --preset=ling_flash_2 [--no-mtp] [--seq_len=4096]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import ml_collections

from ling_jax.configs.presets import PRESETS, get_preset
from ling_jax.model import counting


def _row(name: str, total: int, active: int) -> str:
    return f"{name:<28}{total:>20,}{total / 1e9:>11.3f}{active:>20,}{active / 1e9:>11.3f}"


def format_param_table(
    cfg: ml_collections.ConfigDict, include_mtp: bool = True, seq_len: int = 4096
) -> str:
    """Returns the table as text: one row per module, then totals, ratios and FLOPs per token."""
    params = counting.count_params(cfg, include_mtp=include_mtp)
    flops = counting.flops_per_token(cfg, seq_len, include_mtp=include_mtp, training=True)
    header = f"{'module':<28}{'total':>20}{'total (B)':>11}{'active':>20}{'active (B)':>11}"
    rule = "-" * len(header)
    lines = [header, rule]
    lines += [_row(name, t, a) for name, (t, a) in params.by_module.items()]
    lines += [
        rule,
        _row("total", params.total, params.active),
        _row("active non-embedding", params.active_non_embedding, params.active_non_embedding),
        "",
        f"MTP layer counted:            {'yes' if params.include_mtp else 'no'}",
        f"expert-bias entries (fp32):   {params.expert_bias:,}",
        f"activation ratio A:           {counting.activation_ratio(cfg):.4f}"
        f" = ({cfg.moe.num_experts_per_tok} + {cfg.moe.num_shared_experts})"
        f" / ({cfg.moe.num_experts} + {cfg.moe.num_shared_experts})",
        f"granularity G = 2 d / d_e:    {counting.granularity(cfg):g}",
        "",
        f"training FLOPs per token at seq_len={seq_len} (3 x forward, attention not halved):",
        f"  total                       {flops.total:.4e}",
        f"  matmul (6 x active params)  {flops.matmul:.4e}",
        f"  attention scores            {flops.attention:.4e}",
        f"  lm head                     {flops.lm_head:.4e}",
        f"  mtp                         {flops.mtp:.4e}",
        f"  scaling-law M (non-emb.)    {counting.non_embedding_flops_per_token(cfg, seq_len):.4e}",
    ]
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m ling_jax.model.param_table", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--preset", required=True, help=f"one of {sorted(PRESETS)}")
    parser.add_argument("--no-mtp", action="store_true", help="leave the MTP layer out")
    parser.add_argument("--seq_len", type=int, default=4096, help="sequence length for FLOPs")
    return parser, parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; `argv` excludes the program name (None reads `sys.argv`)."""
    parser, args = _parse_args(argv)
    try:
        cfg = get_preset(args.preset)
    except ValueError as e:
        parser.error(str(e))
    if args.seq_len <= 0:
        parser.error(f"--seq_len={args.seq_len} is invalid: expected a positive integer")
    print(f"preset {args.preset}")
    print(format_param_table(cfg, include_mtp=not args.no_mtp, seq_len=args.seq_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
