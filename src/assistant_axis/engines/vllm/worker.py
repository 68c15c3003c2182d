"""The ops of `ops` placed in a vLLM worker's model before vLLM compiles it, and the tables they read.

vLLM traces and compiles the model (torch.compile; on a GPU then CUDA graphs) while the engine starts,
with no requests, and then drops the trace's guards: whatever the ops are to do later must be in the
model before that, read from tensors that are only ever updated in place. So the engine is started with
`worker_cls` = `AxisWorker` (the platform's own worker, which after loading the model adds forward
hooks that call the ops: traced into the graph with the blocks) and the ops' `Layout` in its
`additional_config`. Which layers carry which op, how many settings and edit stages fit, and how many
requests are measured at once are fixed then; what a setting does is not: `WorkerOps.configure`
writes its vectors and bounds into the tables between steps.

Before each step (the model runner's `_model_forward`, which runs in Python, outside the graph) the
worker writes each row's setting, measurement slot and "last position" flag into preallocated row
tables, and after it puts them back to "none" and the sink slot (vLLM's own warm-up and padding runs
go through the model without a step of ours). A request is measured in a slot of its own from its
first step; when it has left the runner its sums move to the host and the slot is freed.
"""

from __future__ import annotations

import functools
import math

import torch

from assistant_axis.cap import CappingConfig
from assistant_axis.engines.vllm.engine import V1Runner, count_once
from assistant_axis.engines.vllm.ops import LAYOUT_KEY, Layout, operations, settings_stages
from assistant_axis.errors import InputError
from assistant_axis.interventions import Intervention, check_fit
from assistant_axis.models import check_layers, find_blocks

__all__ = ["axis_worker", "WorkerOps"]


@functools.cache
def axis_worker() -> type:
    """vLLM's worker for this platform, with `WorkerOps` added to the model right after it loads. Made
    when vLLM asks for `AxisWorker` (a module attribute made on first use: importing this module does not
    import vLLM)."""
    # vLLM loads only where an engine runs
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker as base
    else:
        from vllm.v1.worker.gpu_worker import Worker as base

    class AxisWorker(base):
        def load_model(self, *args, **kwargs):
            super().load_model(*args, **kwargs)
            layout = (self.vllm_config.additional_config or {}).get(LAYOUT_KEY)
            if layout is not None:
                self.axis_ops = WorkerOps(self, Layout(**layout))

    return AxisWorker


def __getattr__(name: str):
    if name == "AxisWorker":  # what `ops.WORKER_CLASS` names
        return axis_worker()
    raise AttributeError(name)


class WorkerOps:
    """The ops' hooks on the blocks, their tables, the per-step routing and the measurement slots."""

    def __init__(self, worker, layout: Layout):
        self.runner = V1Runner(worker.model_runner)
        model = self.runner.model()
        blocks = find_blocks(model)
        self.blocks, self.n_blocks, self.hidden_size = blocks, len(blocks), self.runner.hidden_size()
        self.layout, self.rank = layout, getattr(worker, "rank", 0)
        self.compiled = worker.vllm_config.compilation_config.mode != 0  # CompilationMode.NONE
        every = list(range(self.n_blocks))
        self.edit, self.measure, self.record = (
            every if layers == "all" else list(layers) for layers in (layout.edit, layout.measure, layout.record)
        )
        for name, layers in (("edit", self.edit), ("measure", self.measure), ("record", self.record)):
            check_layers(layers, self.n_blocks, "engine layout", name)
        device = next(model.parameters()).device
        scheduler = worker.vllm_config.scheduler_config
        self.slots = int(scheduler.max_num_seqs)  # one per running request; slot `slots` is the sink
        rows = int(scheduler.max_num_batched_tokens) + self.slots
        h, s, e = self.hidden_size, layout.settings, layout.stages

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(*shape, dtype=dtype, device=device)

        # The row tables, written before each step.
        self.row_setting = zeros(rows, dtype=torch.long)
        self.row_slot = torch.full((rows,), self.slots, dtype=torch.long, device=device)
        self.row_last = zeros(rows, dtype=torch.bool)
        # The settings' tables, per edit layer (row 0 of each is "none": nothing).
        self.adds = {layer: zeros(e, s, h) for layer in self.edit}
        self.units = {layer: zeros(e, s, h) for layer in self.edit}
        self.floors = {layer: torch.full((e, s), -math.inf, device=device) for layer in self.edit}
        self.ceilings = {layer: torch.full((e, s), math.inf, device=device) for layer in self.edit}
        self.last_only = {layer: zeros(e, s, dtype=torch.bool) for layer in self.edit}
        self.monitor = zeros(len(self.measure), h)  # the unit axis at each measured layer
        self.telemetry = zeros(self.slots + 1, len(self.measure), 3)
        self.recorded = zeros(self.slots + 1, len(self.record), h)
        self.setting_index: dict[str, int] = {"none": 0}
        self.positional: set[int] = set()  # settings with a last-position steer
        # Per request: its slot while it is in the runner; per key, what left its slot, rows counted.
        self.slot_of: dict[str, tuple[int, str]] = {}
        self.free = list(range(self.slots - 1, -1, -1))
        self.host: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.counts: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self.end_layer = None
        self.step_rows = 0  # the rows of the step running now that belong to requests (0 between steps)
        self.owner: int | None = None  # the EngineHooks whose settings the tables hold
        edit, measure, record = operations(layout.custom_ops)
        self.handles = [
            blocks[layer].register_forward_hook(self._hook(layer, edit, measure, record))
            for layer in sorted({*self.edit, *self.measure, *self.record})
        ]
        self.runner.wrap_forward(self._routed)

    # ------------------------------------------------------------------ in the model

    def _hook(self, layer: int, edit, measure, record):
        edits = layer in self.edit
        m = self.measure.index(layer) if layer in self.measure else None
        r = self.record.index(layer) if layer in self.record else None
        tables = (
            (self.adds[layer], self.units[layer], self.floors[layer], self.ceilings[layer], self.last_only[layer])
            if edits
            else None
        )

        def hook(_module, _args, output):
            hidden, residual = output if isinstance(output, tuple) else (output, None)
            n = hidden.shape[0]
            stream = hidden if residual is None else hidden + residual
            fired = before = None
            if tables is not None:
                monitor = self.monitor[m] if m is not None else None
                stream, fired, before = edit(stream, self.row_setting[:n], self.row_last[:n], *tables, monitor)
            if m is not None:
                measure(stream, self.row_slot[:n], self.monitor[m], fired, before, self.telemetry, m)
            if r is not None:
                record(stream, self.row_slot[:n], self.recorded, r)
            if tables is None:
                return None
            # The stream whole in the first part: the next block's fused add of (stream, 0) gives it back.
            return (stream, torch.zeros_like(residual), *output[2:]) if residual is not None else stream

        return hook

    # ------------------------------------------------------------------ each step

    def _routed(self, forward):
        def routed_forward(*args, **kwargs):
            input_ids, positions = kwargs.get("input_ids"), kwargs.get("positions")
            n = self.step_rows = self._route(input_ids, positions)
            try:
                return forward(*args, **kwargs)
            finally:
                self.step_rows = 0
                if n:
                    self.row_setting[:n] = 0
                    self.row_slot[:n] = self.slots
                    self.row_last[:n] = False

        return routed_forward

    def _route(self, input_ids, positions) -> int:
        live = self.runner.runner.requests
        for req_id in [r for r in self.slot_of if r not in live]:
            self._evict(req_id)
        requests = self.runner.scheduled(input_ids, positions)
        if not requests:
            return 0
        n = requests[-1].end
        setting = torch.zeros(n, dtype=torch.long)
        slot = torch.full((n,), self.slots, dtype=torch.long)
        last = torch.zeros(n, dtype=torch.bool)
        for request in requests:
            extra = request.extra
            if not extra or "key" not in extra:
                continue
            key, index = extra["key"], self.setting_index.get(extra.get("setting"), 0)
            setting[request.start : request.end] = index
            since, until = extra.get("span") or (None, None)
            since = request.prompt_len if since is None else since
            until = math.inf if until is None else until
            a, b = count_once(self.seen, key, request, since, until)
            if b > a:
                slot[a:b] = self._slot(request.req_id, key)
                self.counts[key] = self.counts.get(key, 0) + b - a
            if index in self.positional:
                # "Last position" edits act on the prompt's last token and each token after it: in a
                # chunked prefill a chunk's last row is not the prompt's last.
                first = request.start + max(0, request.prompt_len - 1 - request.first)
                last[min(first, request.end) : request.end] = True
        self.row_setting[:n].copy_(setting, non_blocking=True)
        self.row_slot[:n].copy_(slot, non_blocking=True)
        self.row_last[:n].copy_(last, non_blocking=True)
        return n

    def _slot(self, req_id: str, key: str) -> int:
        if req_id in self.slot_of:
            return self.slot_of[req_id][0]
        if not self.free:
            raise RuntimeError(f"all {self.slots} measurement slots are taken (max_num_seqs)")
        self.slot_of[req_id] = (self.free.pop(), key)
        return self.slot_of[req_id][0]

    def _evict(self, req_id: str) -> None:
        """Move a request's sums from its slot to the host (it has left the runner) and free the slot."""
        slot, key = self.slot_of.pop(req_id)
        with torch.inference_mode():  # the sums were made in the engine's inference mode
            # copies (`.cpu()` of a CPU tensor would be the slot itself, zeroed below)
            telemetry, recorded = self.telemetry[slot].to("cpu", copy=True), self.recorded[slot].to("cpu", copy=True)
            self.telemetry[slot] = 0.0
            self.recorded[slot] = 0.0
        if key in self.host:
            kept = self.host[key]
            telemetry, recorded = telemetry + kept[0], recorded + kept[1]
        self.host[key] = (telemetry, recorded)
        self.free.append(slot)

    # ------------------------------------------------------------------ between steps (collective_rpc)

    def configure(
        self, owner: int | None, units: torch.Tensor, layers: list[int], settings: dict[str, list[Intervention]]
    ) -> None:
        """Measure `layers` along `units` and apply `settings` (name -> interventions in order, "none"
        included or not): every table is rewritten in place. `owner` (an `EngineHooks`'s id; None: give
        them back) holds the tables until it gives them back: two sets of settings at once would overwrite
        each other."""
        if owner is not None and self.owner not in (None, owner):
            raise RuntimeError("this engine's settings belong to another EngineHooks: remove it first")
        if len(layers) and units.shape[-1] != self.hidden_size:
            raise InputError(
                "axis", "hidden_size", f"axis has hidden size {units.shape[-1]}, the model has {self.hidden_size}"
            )
        missing = [layer for layer in layers if layer not in self.measure]
        if missing:
            raise InputError("engine layout", "measure", f"layers {missing} carry no telemetry ({self.measure})")
        check_fit([i for ivs in settings.values() for i in ivs], self.n_blocks, self.hidden_size)
        names = [name for name in settings if name != "none"]
        if len(names) + 1 > self.layout.settings:
            raise InputError("engine layout", "settings", f"{len(names) + 1} settings, {self.layout.settings} fit")
        stages = {name: settings_stages(settings[name]) for name in settings}
        for name, at in stages.items():
            for layer, steps in at.items():
                if layer not in self.edit:
                    raise InputError(
                        "engine layout", "edit", f"setting {name!r} edits layer {layer}, which carries no edit op"
                    )
                if len(steps) > self.layout.stages:
                    raise InputError(
                        "engine layout", "stages", f"setting {name!r} needs {len(steps)} stages at layer {layer}"
                    )
        with torch.inference_mode():
            self.monitor.zero_()
            for layer, unit in zip(layers, units, strict=True):
                self.monitor[self.measure.index(layer)] = unit.to(self.monitor)
            for layer in self.edit:
                self.adds[layer].zero_()
                self.units[layer].zero_()
                self.floors[layer].fill_(-math.inf)
                self.ceilings[layer].fill_(math.inf)
                self.last_only[layer].fill_(False)
            self.setting_index = {"none": 0, **{name: i + 1 for i, name in enumerate(names)}}
            self.positional = set()
            for name, at in stages.items():
                index = self.setting_index[name]
                for layer, steps in at.items():
                    for stage, interventions in enumerate(steps):
                        for intervention in interventions:
                            self._write(layer, stage, index, intervention)
                if any(getattr(iv, "positions", "all") != "all" for iv in settings[name]):
                    self.positional.add(index)
        self.owner = owner

    def _write(self, layer: int, stage: int, index: int, intervention: Intervention) -> None:
        k = intervention.layers.index(layer)
        if isinstance(intervention, CappingConfig):
            self.units[layer][stage, index] = intervention.vectors[k].float().to(self.units[layer].device)
            self.floors[layer][stage, index] = float(intervention.thresholds[k])
            if intervention.upper is not None:
                self.ceilings[layer][stage, index] = float(intervention.upper[k])
        else:  # a steer: its vector, at every position or the last
            self.adds[layer][stage, index] = intervention.shifts[k].float().to(self.adds[layer].device)
            self.last_only[layer][stage, index] = getattr(intervention, "positions", "all") != "all"

    def taken(self, keys: list[str] | None, forget: bool, recorded: bool = False) -> dict[str, tuple]:
        """Per key (every measured one if None): its telemetry sums [measured, 3], its recorded sums
        [recorded, hidden] (with `recorded`, else None) and its rows counted; `forget` frees them (the key
        may come again)."""
        live = {key: (slot, req_id) for req_id, (slot, key) in self.slot_of.items()}
        keys = list(self.counts) if keys is None else keys
        out = {}
        with torch.inference_mode():
            telemetry_now = self.telemetry.to("cpu", copy=True)  # one copy for every slot
            for key in keys:
                held, (slot, req_id) = self.host.get(key), live.get(key, (None, None))
                telemetry = held[0].clone() if held else torch.zeros(len(self.measure), 3)
                if slot is not None:
                    telemetry += telemetry_now[slot]
                sums = None
                if recorded:
                    sums = held[1].clone() if held else torch.zeros(len(self.record), self.hidden_size)
                    if slot is not None:
                        sums += self.recorded[slot].to("cpu", copy=True)
                out[key] = (telemetry, sums, self.counts.get(key, 0))
                if forget:
                    if slot is not None:
                        self.telemetry[slot] = 0.0
                        self.recorded[slot] = 0.0
                        del self.slot_of[req_id]
                        self.free.append(slot)
                    self.host.pop(key, None)
                    self.counts.pop(key, None)
                    self.seen.pop(key, None)
        return out

    def stop_after(self, layer: int | None) -> None:
        """Run the blocks only up to `layer` (prefill-only recording: later blocks' output is not read);
        None runs them all again. Eager engines only: a compiled graph keeps the blocks it was traced with."""
        inner = next((m for m in self.runner.model().modules() if getattr(m, "layers", None) is self.blocks), None)
        if self.compiled or getattr(inner, "end_layer", None) is None:
            return
        if layer is None:
            if self.end_layer is not None:
                inner.end_layer, self.end_layer = self.end_layer, None
        elif inner.end_layer == self.n_blocks:
            self.end_layer, inner.end_layer = inner.end_layer, layer + 1
