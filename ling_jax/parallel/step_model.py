"""A step-time estimate from compiled per-layer costs: compute, communication, implied MFU.

XLA's cost analysis of a whole train step counts each scanned layer stack once, so instead
one layer of each kind (dense, MoE, MTP) is compiled on its own, its FLOPs and collective bytes
read per chip, and multiplied by how many layers of that kind the model has. Communication
time is the collective bytes over the interconnect's one-way bandwidth per chip (ICI within a
slice, DCN across slices). Two step times bracket the truth: `serial` (no overlap of compute
and communication) and `overlapped` (perfect overlap, the larger of the two); the implied MFU
is the model FLOPs over chips x peak x step time.

Interconnect figures per chip (Google Cloud TPU documentation, "System architecture" tables):
  v5e  ICI 400 GB/s bidirectional; DCN 2 x 100 Gbps NICs per 8-chip host = 25 Gbps per chip
       (https://cloud.google.com/tpu/docs/v5e)
  v5p  ICI 1200 GB/s bidirectional; DCN 50 Gbps per chip (https://cloud.google.com/tpu/docs/v5p)
  v6e  ICI 800 GB/s bidirectional (https://cloud.google.com/tpu/docs/v6e); DCN not in that
       table, so multi-slice v6e estimates are refused rather than guessed.
  v4   not in this table (no per-chip figure at hand): refused.
"""

from __future__ import annotations

import dataclasses

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Interconnect:
    ici_bidirectional: float  # bytes/s per chip, both directions together
    dcn: float | None  # bytes/s per chip (one way), None where not published

    @property
    def ici_one_way(self) -> float:
        """A chip sends at half its bidirectional ICI bandwidth (the other half receives)."""
        return self.ici_bidirectional / 2


INTERCONNECTS = {
    "v5e": Interconnect(400 * GB, 2 * 100e9 / 8 / 8),
    "v5p": Interconnect(1200 * GB, 50e9 / 8),
    "v6e": Interconnect(800 * GB, None),
}


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One compiled layer's per-chip cost, and how many such layers a step runs."""

    kind: str  # "dense", "moe", "mtp", "rest" (embedding, head, optimizer)
    count: int
    flops: float  # per chip, per layer (forward + backward as compiled)
    ici_bytes: float  # collective bytes per chip within the slice, per layer
    dcn_bytes: float = 0.0  # collective bytes per chip across slices, per layer


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    compute_seconds: float
    ici_seconds: float
    dcn_seconds: float
    serial_seconds: float
    overlapped_seconds: float
    mfu_serial: float
    mfu_overlapped: float


def interconnect(generation: str) -> Interconnect:
    if generation not in INTERCONNECTS:
        raise ValueError(
            f"no interconnect figures for TPU {generation!r}; known: {sorted(INTERCONNECTS)}"
        )
    return INTERCONNECTS[generation]


def estimate_step(
    layers: list[LayerCost],
    *,
    generation: str,
    peak_flops: float,
    chips: int,
    model_flops: float,
) -> StepEstimate:
    """Compute and communication time of one step from per-layer costs (see the module doc).

    peak_flops: per chip; model_flops: the whole step's model FLOPs (what MFU counts).
    """
    if peak_flops <= 0 or chips <= 0:
        raise ValueError(f"peak_flops ({peak_flops}) and chips ({chips}) must be positive")
    for layer in layers:
        if layer.count < 0 or min(layer.flops, layer.ici_bytes, layer.dcn_bytes) < 0:
            raise ValueError(f"negative cost in {layer}")
    link = interconnect(generation)
    compute = sum(layer.count * layer.flops for layer in layers) / peak_flops
    ici = sum(layer.count * layer.ici_bytes for layer in layers) / link.ici_one_way
    dcn_bytes = sum(layer.count * layer.dcn_bytes for layer in layers)
    if dcn_bytes and link.dcn is None:
        raise ValueError(f"TPU {generation} has no DCN figure; cannot time cross-slice traffic")
    dcn = dcn_bytes / link.dcn if dcn_bytes else 0.0
    serial = compute + ici + dcn
    overlapped = max(compute, ici + dcn)

    def mfu(seconds: float) -> float:
        return model_flops / (chips * peak_flops * seconds) if seconds > 0 else 0.0

    return StepEstimate(compute, ici, dcn, serial, overlapped, mfu(serial), mfu(overlapped))
