"""The operations a vLLM engine's model runs at the layers that carry them: `edit` (each row's setting's
steering and caps), `measure` (projection telemetry) and `record` (activation sums). By default they are
plain tensor code that torch.compile traces into the model's graph (and a CUDA graph captures); they are
also registered custom ops (`assistant_axis::edit`, `::measure`, `::record`) with fake implementations,
for a compiler that must not look inside (`Layout.custom_ops`).

They read per-row tables that the worker fills before each step (`worker`): the row's setting index
(0 is "none"), its measurement slot (the last slot is a sink for rows nobody measures) and whether it is
at or past its prompt's last position. Everything a setting changes lives in tensors indexed by that
setting, so a setting added after the graph was traced applies, and nothing here branches on data,
synchronises with the host or keeps state between calls; `measure` and `record` add into the slot
buffers they are given and declare that they do (so the compiler keeps them).

An edit stage is "add a vector, then cap": `h <- h + a`, then `h <- h - u * cap_shift(<h, u>, floor,
ceiling)` in float32 (`cap.cap_shift`, the transformers path's arithmetic). A setting without steering
at a stage has `a = 0`, one without a cap has `u = 0` and infinite bounds: both leave a row's values as
they were, bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from assistant_axis.cap import CappingConfig, cap_shift
from assistant_axis.interventions import Intervention

__all__ = ["Layout", "settings_stages", "edit_rows", "measure_rows", "record_rows", "operations"]

LAYOUT_KEY = "assistant_axis"  # an engine's additional_config[LAYOUT_KEY] is its Layout
WORKER_CLASS = "assistant_axis.engines.vllm.worker.AxisWorker"  # the worker that places the ops


@dataclass(frozen=True)
class Layout:
    """What the model carries, fixed when the engine starts. Layers are block indices, or "all"."""

    edit: list[int] | str = field(default_factory=list)  # layers whose stream a setting may change
    measure: list[int] | str = field(default_factory=list)  # layers with projection telemetry
    record: list[int] | str = field(default_factory=list)  # layers whose activations can be recorded
    settings: int = 8  # settings that fit, "none" included
    stages: int = 1  # edit stages per layer (a steer, then a cap, each)
    # False: the functions traced into the graph, where inductor fuses them with each other and the block's
    # own kernels (the default: 1.01x the uncapped engine's speed against 0.89x, benchmarks/README.md);
    # True: the registered ops, opaque to the compiler, each call its eager body.
    custom_ops: bool = False

    def as_config(self) -> dict:
        return {LAYOUT_KEY: asdict(self)}


def settings_stages(interventions: list[Intervention]) -> dict[int, list[list[Intervention]]]:
    """Per layer, the stages the interventions take there in order: a steer and a cap after it share one."""
    stages: dict[int, list[list[Intervention]]] = {}
    for intervention in interventions:
        for layer in intervention.layers:
            at = stages.setdefault(layer, [])
            capping = isinstance(intervention, CappingConfig)
            if not at or any(isinstance(i, CappingConfig) for i in at[-1]) or not capping:
                at.append([intervention])
            else:
                at[-1].append(intervention)
    return stages


def edit_rows(
    stream: torch.Tensor,  # [n, hidden] the residual stream after the block
    setting: torch.Tensor,  # [n] int64 each row's setting
    last: torch.Tensor,  # [n] bool: the row is at or past its prompt's last position
    adds: torch.Tensor,  # [stages, settings, hidden] float32 steering added at each stage
    units: torch.Tensor,  # [stages, settings, hidden] float32 unit axis capped at each stage (0: no cap)
    floors: torch.Tensor,  # [stages, settings] float32 (-inf: none)
    ceilings: torch.Tensor,  # [stages, settings] float32 (inf: none)
    last_only: torch.Tensor,  # [stages, settings] bool: the stage's steering acts on `last` rows only
    monitor: torch.Tensor | None,  # [hidden] the unit axis telemetry measures at this layer, if it does
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The edited stream, whether a cap changed each row (float 0/1) and each row's projection on
    `monitor` just before its setting's first cap here (what firing is measured against: the setting's
    own steering before it is not firing)."""
    x = stream
    n = x.shape[0]
    fired = torch.zeros(n, dtype=torch.bool, device=x.device)
    before = torch.zeros(n, dtype=torch.float32, device=x.device)
    seen = torch.zeros(n, dtype=torch.bool, device=x.device)
    for stage in range(adds.shape[0]):
        steer = adds[stage][setting] * torch.where(last_only[stage][setting], last, True).unsqueeze(-1)
        x = x + steer.to(x.dtype)
        unit, floor, ceiling = units[stage][setting], floors[stage][setting], ceilings[stage][setting]
        capped = torch.isfinite(floor) | torch.isfinite(ceiling)
        xf = x.float()
        if monitor is not None:
            before = torch.where(capped & ~seen, xf @ monitor, before)
            seen = seen | capped
        shift = cap_shift((xf * unit).sum(-1), floor, ceiling)
        fired = fired | (shift != 0)
        x = (xf - shift.unsqueeze(-1) * unit).to(stream.dtype)
    return x, fired.float(), before


def measure_rows(
    stream: torch.Tensor,
    slot: torch.Tensor,  # [n] int64 each row's measurement slot
    unit: torch.Tensor,  # [hidden] the unit axis at this layer
    fired: torch.Tensor | None,  # [n] from `edit_rows` where this layer edits
    before: torch.Tensor | None,
    sums: torch.Tensor,  # [slots, measured layers, 3]: projection, fired, change sums
    index: int,  # this layer's place among the measured layers
) -> None:
    after = stream.float() @ unit
    if fired is None or before is None:
        fired = change = torch.zeros_like(after)
    else:
        change = torch.where(fired > 0, after - before, 0.0)
    sums[:, index].index_add_(0, slot, torch.stack([after, fired, change], dim=-1))


def record_rows(stream: torch.Tensor, slot: torch.Tensor, sums: torch.Tensor, index: int) -> None:
    """Add each row's stream (float32) into its slot's sum at `index` of `sums` [slots, recorded layers, hidden]."""
    sums[:, index].index_add_(0, slot, stream.float())


# ---------------------------------------------------------------------- as custom ops


@torch.library.custom_op("assistant_axis::edit", mutates_args=())
def _edit(
    stream: torch.Tensor,
    setting: torch.Tensor,
    last: torch.Tensor,
    adds: torch.Tensor,
    units: torch.Tensor,
    floors: torch.Tensor,
    ceilings: torch.Tensor,
    last_only: torch.Tensor,
    monitor: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return edit_rows(stream, setting, last, adds, units, floors, ceilings, last_only, monitor)


@_edit.register_fake
def _(stream, setting, last, adds, units, floors, ceilings, last_only, monitor):
    n = stream.shape[0]
    return torch.empty_like(stream), stream.new_empty(n, dtype=torch.float32), stream.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("assistant_axis::measure", mutates_args=("sums",))
def _measure(
    stream: torch.Tensor,
    slot: torch.Tensor,
    unit: torch.Tensor,
    fired: torch.Tensor | None,
    before: torch.Tensor | None,
    sums: torch.Tensor,
    index: int,
) -> None:
    measure_rows(stream, slot, unit, fired, before, sums, index)


@_measure.register_fake
def _(stream, slot, unit, fired, before, sums, index):
    return None


@torch.library.custom_op("assistant_axis::record", mutates_args=("sums",))
def _record(stream: torch.Tensor, slot: torch.Tensor, sums: torch.Tensor, index: int) -> None:
    record_rows(stream, slot, sums, index)


@_record.register_fake
def _(stream, slot, sums, index):
    return None


def operations(custom: bool):
    """(edit, measure, record): the registered ops, or (`custom=False`) the same functions inline, which
    the compiler traces into and may fuse with the model's own kernels."""
    if custom:
        return torch.ops.assistant_axis.edit, torch.ops.assistant_axis.measure, torch.ops.assistant_axis.record
    return edit_rows, measure_rows, record_rows
