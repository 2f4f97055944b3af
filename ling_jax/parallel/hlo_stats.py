"""Counts read from a program's text: collective bytes (compiled HLO) and matmul FLOPs (StableHLO).

Why two texts: the compiled TPU HLO names every collective with its result shape, but rewrites
batched matmuls into convolutions (dilated, relabelled) whose FLOPs are hard to recover, while
the lowered StableHLO still holds each `dot_general` with its operand and result types. Loops
matter for FLOPs: XLA's cost analysis counts a `while` body once, so this module reports the
FLOPs of dots inside loop bodies per iteration, separately from those outside; the caller
multiplies by the trip counts it knows (`scan` length, or a data-dependent count).
"""

from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
COLLECTIVES = (
    "all-to-all",
    "ragged-all-to-all",
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "collective-permute",
)
# `%name = bf16[8,128]{1,0:T(8,128)} op(` ; tuple results (async starts) are skipped.
_HLO_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\]\S*\s+([\w-]+)\("
)
_HLO_OPERANDS = re.compile(r"\(([^)]*)\)")


def shape_bytes(dtype: str, dims: str) -> int:
    """Bytes of an HLO array shape, e.g. ("bf16", "8,128"); 0 for non-data types (token)."""
    if dtype not in _DTYPE_BYTES:
        return 0
    return _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)


@dataclasses.dataclass
class Collective:
    op: str  # one of COLLECTIVES
    name: str
    result_bytes: int  # the result buffer
    operand_bytes: int  # the data operand (the first); = result_bytes for all-to-all


def hlo_collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled HLO module, with its result and data-operand bytes.

    The operand's size comes from its defining instruction; when that is not an array
    instruction of this text (a computation parameter, an async start's tuple), the result
    size stands in.
    """
    sizes: dict[str, int] = {}
    found = []
    for line in hlo_text.splitlines():
        match = _HLO_INSTRUCTION.match(line)
        if not match:
            continue
        name, dtype, dims, op = match.groups()
        sizes[name] = shape_bytes(dtype, dims)
        # An async pair counts once, at its `-done` (the `-start` returns a tuple).
        base = op.removesuffix("-done")
        if base in COLLECTIVES:
            args = _HLO_OPERANDS.search(line[match.end() - 1 :]).group(1)
            first = args.split(",")[0].strip().lstrip("%")
            found.append(Collective(base, name, sizes[name], sizes.get(first, sizes[name])))
    return found


def collective_bytes(hlo_text: str) -> dict[str, tuple[int, int]]:
    """op -> (count, summed data-operand bytes) over a compiled HLO module."""
    totals: dict[str, tuple[int, int]] = {}
    for c in hlo_collectives(hlo_text):
        count, total = totals.get(c.op, (0, 0))
        totals[c.op] = (count + 1, total + c.operand_bytes)
    return totals


@dataclasses.dataclass
class Dot:
    flops: int  # 2 x output elements x contracted size
    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    loop_depth: int  # how many `while` bodies enclose it (0: runs once per call)


_TENSOR = re.compile(r"tensor<([0-9x]*)x?[a-z][a-z0-9]*>")
_CONTRACTING = re.compile(r"contracting_dims\s*=\s*\[([0-9, ]*)\]\s*x\s*\[([0-9, ]*)\]")
_FUNC = re.compile(r"func\.func\s+(?:public\s+|private\s+)?@([\w.$-]+)\(")
_CALL = re.compile(r"(?:func\.)?call\s+@([\w.$-]+)\(")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("x") if d)


def _dot(line: str, depth: int) -> Dot | None:
    types = _TENSOR.findall(line.split(" : ")[-1])
    contracting = _CONTRACTING.search(line)
    if len(types) < 3 or not contracting:
        return None
    lhs, rhs, out = (_dims(t) for t in types[-3:])
    lhs_contract = [int(d) for d in contracting.group(1).split(",") if d.strip()]
    flops = 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
    return Dot(flops, lhs, rhs, out, depth)


def _functions(mlir_text: str):
    """name -> (dots at their depth within the function, [(callee, depth of the call)])."""
    functions: dict[str, tuple[list[Dot], list[tuple[str, int]]]] = {}
    current = None
    stack: list[str] = []  # one entry per open brace: "loop" for a while's do-region
    for line in mlir_text.splitlines():
        stripped = line.strip()
        func = _FUNC.search(stripped)
        if func:
            current = functions.setdefault(func.group(1), ([], []))
            stack = []
        depth = stack.count("loop")
        if current is not None and "stablehlo.dot_general" in stripped:
            dot = _dot(stripped, depth)
            if dot is not None:
                current[0].append(dot)
        if current is not None:
            current[1].extend((callee, depth) for callee in _CALL.findall(stripped))
        for char in stripped:
            if char == "{":
                stack.append("loop" if stripped.startswith("} do {") else "other")
            elif char == "}" and stack:
                stack.pop()
    return functions


def stablehlo_dots(mlir_text: str, entry: str = "main") -> list[Dot]:
    """Every `stablehlo.dot_general` run by `entry`, once per call site, with its FLOPs and
    loop depth: the number of `while` bodies (`} do {` regions) around it, through calls."""
    functions = _functions(mlir_text)
    if entry not in functions:
        raise ValueError(f"no function @{entry} in the module (have {sorted(functions)[:5]})")

    def expand(name: str, depth: int, seen: tuple[str, ...]) -> list[Dot]:
        if name in seen:  # Recursion cannot occur in StableHLO; guard anyway.
            raise ValueError(f"recursive call to @{name}")
        dots, calls = functions.get(name, ([], []))
        out = [dataclasses.replace(d, loop_depth=d.loop_depth + depth) for d in dots]
        for callee, call_depth in calls:
            out += expand(callee, depth + call_depth, (*seen, name))
        return out

    return expand(entry, 0, ())
