"""Interventions and projection telemetry inside a vLLM engine, per request, under continuous batching.

vLLM runs every scheduled request's tokens through the model as one flattened batch `[tokens, hidden]`,
and a decoder layer returns the residual stream in two parts, `(hidden_states, residual)`, whose sum
is the stream (the add is deferred into the next layer's fused norm). `EngineHooks` therefore:

- wraps the model runner's forward so that, before each step, it knows which rows belong to which
  request (the runner's `query_start_loc`), which setting each request asked for (its
  `SamplingParams.extra_args`) and which rows are reply tokens (position past the prompt);
- hooks the decoder layers: on a layer some setting edits it forms the stream, applies the same
  `Intervention.edit` the transformers path applies (`interventions`) to that setting's rows only, and
  returns `(stream, 0)`, which the next layer's fused add turns back into exactly that stream; rows it
  does not edit keep their values bit for bit;
- sums, per request, each monitored layer's post-intervention projection on the unit axis over the
  reply's tokens, and where a cap changed it (the cap fired) the change (steering before it is not
  counted as firing).

A reply's tokens, as measured here, are the generated tokens fed back into the model: all of a reply
that stopped at its end-of-turn token (which is never fed back), all but the last of one cut by
`max_tokens`. Capped and uncapped requests share one batch; the cost is one add per edited layer and
token, and a gather/scatter per setting present in the step.

Needs the engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, which `hooked_engine` sets),
tensor parallel 1, and eager mode: CUDA graphs replay captured kernels and would skip Python hooks
(capturing the edits into the graph would need them written as custom ops).

>>> llm = hooked_engine(vllm_engine_args("results/models/smollm2-135m-instruct", {}, "serve"))
>>> hooks = EngineHooks(llm, units, [20, 24], {"none": [], "late-p25": [capping]})
>>> out = llm.generate(prompts, [hooks.sampling_params("late-p25", key, max_tokens=64) for key in keys])
>>> hooks.pop(keys[0]).projection
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from assistant_axis.cap import CappingConfig
from assistant_axis.errors import InputError
from assistant_axis.interventions import Intervention, check_fit
from assistant_axis.models import check_layers, find_blocks

__all__ = ["Telemetry", "EngineHooks", "ActivationRecorder", "hooked_engine", "recording_engine", "EXTRA_ARGS_KEY"]

# SamplingParams.extra_args[EXTRA_ARGS_KEY] = {"key": ..., "setting": (EngineHooks) or "span": (ActivationRecorder)}
EXTRA_ARGS_KEY = "assistant_axis"


@dataclass(frozen=True)
class Telemetry:
    """One reply's numbers, per monitored layer (`layers`); None where the reply fed back no token."""

    layers: list[int]
    projection: list[float | None]  # mean post-intervention projection on the unit axis
    fired: list[float | None]  # share of the reply's tokens whose projection a cap changed
    correction: list[float | None]  # mean change of the projection over those tokens (0 when none)
    tokens: int  # reply tokens measured

    def as_dict(self) -> dict:
        return {
            "layers": self.layers,
            "values": self.projection,
            "fired": self.fired,
            "correction": self.correction,
            "tokens": self.tokens,
        }


def hooked_engine(args: dict, key: str = "engine"):
    """A vLLM `LLM` whose model lives in this process, eager, tensor parallel 1: what `EngineHooks` needs."""
    if int(args.get("tensor_parallel_size", 1) or 1) != 1:
        raise InputError("config", f"{key}.tensor_parallel_size", "interventions inside vLLM need tensor parallel 1")
    return recording_engine(args, key)


def recording_engine(args: dict, key: str = "engine"):
    """A vLLM `LLM` for `ActivationRecorder`: eager (hooks do not fire inside CUDA graphs) and its engine core in
    this process, so with tensor parallel 1 the model is too; with more, each worker process records alike."""
    from assistant_axis.backends import vllm_engine

    # Only this engine: another one started later in this process (a test's, say) keeps its own process,
    # so that shutting it down does not take this process's distributed state with it.
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        return vllm_engine({**args, "enforce_eager": True}, key)
    finally:
        if before is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before


def _scheduled(runner) -> tuple[list[int], list[tuple[str, dict | None, int]]]:
    """This step's row offsets (`query_start_loc`: request i owns rows [starts[i], starts[i+1])) and, per
    request, its id, our extra args (None for a request that has none) and its prompt length."""
    batch = runner.input_batch
    n_reqs = batch.num_reqs
    starts = runner.query_start_loc.np[: n_reqs + 1].tolist()
    requests = []
    for req_id in batch.req_ids[:n_reqs]:
        state = runner.requests[req_id]
        extra = ((state.sampling_params.extra_args or {}) if state.sampling_params else {}).get(EXTRA_ARGS_KEY)
        requests.append((req_id, extra, len(state.prompt_token_ids or ())))
    return starts, requests


@dataclass
class _Step:
    """Who owns which rows of one engine step."""

    n_tokens: int
    keys: list[str]  # one per request slot
    slot: torch.Tensor  # [n_tokens] request slot of each row
    reply: torch.Tensor  # [n_tokens] bool: the row is a reply token
    rows: dict[str, torch.Tensor]  # setting -> its rows
    segments: dict[str, list[tuple[int, int]]]  # setting -> its requests' (start, end) rows
    sums: torch.Tensor | None = None  # [slots, layers, 3]: projection, fired, correction sums


class EngineHooks:
    """Per-request interventions (`settings`: name -> interventions, applied in order) and telemetry on
    `layers` (unit axis rows `units` [len(layers), hidden]) in one in-process vLLM engine."""

    def __init__(
        self,
        llm,
        units: torch.Tensor,
        layers: Sequence[int],
        settings: Mapping[str, Sequence[Intervention]],
        source: str = "axis",
    ):
        self.llm, self.layers, self.settings = llm, list(layers), {k: list(v) for k, v in settings.items()}
        if len(units) != len(self.layers):
            raise InputError(source, "layers", f"{len(units)} axis rows for {len(self.layers)} layers")
        self.units = units.float()
        self.step: _Step | None = None
        self.totals: dict[str, torch.Tensor] = {}  # key -> [layers, 4]: sums and the token count
        self.handles: list = []
        (self.n_blocks,) = llm.collective_rpc(self._install)

    # ------------------------------------------------------------------ requests

    def sampling_params(self, setting: str, key: str, **sampling):
        """`SamplingParams` for one request under `setting`, its telemetry filed under `key`."""
        from vllm import SamplingParams

        if setting not in self.settings:
            raise InputError("request", "capping", f"unknown setting {setting!r} (known: {', '.join(self.settings)})")
        return SamplingParams(**sampling, extra_args={EXTRA_ARGS_KEY: {"setting": setting, "key": key}})

    def pop(self, key: str) -> Telemetry:
        """The telemetry of the request filed under `key` (forgotten afterwards)."""
        return self._telemetry(self.totals.pop(key, None))

    def peek(self, key: str) -> Telemetry:
        """The telemetry so far of a request still running."""
        return self._telemetry(self.totals.get(key))

    def _telemetry(self, total: torch.Tensor | None) -> Telemetry:
        n = 0 if total is None else int(total[0, 3])
        if n == 0:
            none = [None] * len(self.layers)
            return Telemetry(list(self.layers), none, none, none, 0)
        proj, fired, corr = total[:, 0] / n, total[:, 1], total[:, 2]
        correction = torch.where(fired > 0, corr / fired.clamp(min=1), torch.zeros_like(corr))
        return Telemetry(list(self.layers), _floats(proj), _floats(fired / n), _floats(correction), n)

    def remove(self) -> None:
        self.llm.collective_rpc(self._uninstall)

    # ------------------------------------------------------------------ inside the worker

    def _install(self, worker) -> int:
        runner = worker.model_runner
        blocks = find_blocks(runner.get_model())
        check_layers(self.layers, len(blocks), "layers", "layers")
        size = int(runner.model_config.get_hidden_size())
        if self.units.shape[-1] != size:
            raise InputError(
                "axis", "hidden_size", f"axis has hidden size {self.units.shape[-1]}, the model has {size}"
            )
        check_fit([i for ivs in self.settings.values() for i in ivs], len(blocks), int(self.units.shape[-1]))
        edits: dict[int, list[tuple[str, Intervention, int]]] = {}
        for name, interventions in self.settings.items():
            for intervention in interventions:
                for k, layer in enumerate(intervention.layers):
                    edits.setdefault(layer, []).append((name, intervention, k))
        for layer in sorted(set(self.layers) | set(edits)):
            monitored = self.layers.index(layer) if layer in self.layers else None
            hook = self._hook(layer, edits.get(layer, []), monitored)
            self.handles.append(blocks[layer].register_forward_hook(hook))
        forward = runner._model_forward
        runner._axis_forward = forward  # the original, restored by _uninstall

        def routed_forward(*args, **kwargs):
            self.step = self._route(runner, kwargs.get("positions"))
            try:
                out = forward(*args, **kwargs)
                self._file(self.step)
                return out
            finally:
                self.step = None

        runner._model_forward = routed_forward
        return len(blocks)

    def _uninstall(self, worker) -> None:
        runner = worker.model_runner
        if hasattr(runner, "_axis_forward"):
            runner._model_forward = runner._axis_forward
            del runner._axis_forward
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _route(self, runner, positions: torch.Tensor | None) -> _Step | None:
        if runner.input_batch.num_reqs == 0 or positions is None:
            return None
        starts, requests = _scheduled(runner)
        n_tokens = int(starts[-1])
        device = positions.device
        keys, prompt_lens, rows, segments = [], [], {}, {}
        for i, (req_id, extra, prompt_len) in enumerate(requests):
            setting, key = (extra.get("setting"), extra["key"]) if extra else (None, req_id)
            keys.append(key)
            prompt_lens.append(prompt_len)
            if setting in self.settings and self.settings[setting]:
                segments.setdefault(setting, []).append((starts[i], starts[i + 1]))
        counts = torch.tensor([b - a for a, b in zip(starts, starts[1:], strict=False)])
        slot = torch.repeat_interleave(torch.arange(len(requests)), counts).to(device)
        prompt = torch.repeat_interleave(torch.tensor(prompt_lens), counts).to(device)
        reply = positions[:n_tokens] >= prompt
        for setting, spans in segments.items():
            rows[setting] = torch.cat([torch.arange(a, b) for a, b in spans]).to(device)
        return _Step(n_tokens, keys, slot, reply, rows, segments)

    def _hook(self, layer: int, edits: list[tuple[str, Intervention, int]], monitored: int | None):
        unit = self.units[monitored] if monitored is not None else None

        def hook(_module, _args, output):
            step = self.step
            if step is None:
                return None
            hidden, residual = output
            n = step.n_tokens
            acting = [(name, iv, k) for name, iv, k in edits if name in step.rows]
            stream = hidden + residual if residual is not None else hidden
            before = None  # the projection before the first cap: what a cap's firing is measured against
            if acting:
                stream = stream.clone()
                for name, intervention, k in acting:
                    if before is None and unit is not None and isinstance(intervention, CappingConfig):
                        before = stream[:n].float() @ unit.to(stream.device)
                    if getattr(intervention, "positions", "all") == "all":
                        rows = step.rows[name]
                        stream[rows] = intervention.edit(k, stream[rows])
                    else:  # an edit that depends on the request's own token order (steering the last token)
                        for a, b in step.segments[name]:
                            stream[a:b] = intervention.edit(k, stream[a:b])
            if unit is not None:
                after = stream[:n].float() @ unit.to(stream.device)
                change = ((after - before) if before is not None else torch.zeros_like(after)) * step.reply
                values = torch.stack([after * step.reply, (change != 0).float(), change], dim=-1)
                if step.sums is None:
                    step.sums = torch.zeros(len(step.keys), len(self.layers), 3, device=stream.device)
                step.sums[:, monitored].index_add_(0, step.slot, values)
            if not acting:
                return None
            return stream, torch.zeros_like(residual) if residual is not None else None

        return hook

    def _file(self, step: _Step | None) -> None:
        """Add one step's sums to each request's totals (on the CPU: one copy per step)."""
        if step is None:
            return
        replies = torch.zeros(len(step.keys)).index_add_(0, step.slot.cpu(), step.reply.cpu().float())
        sums = step.sums.cpu() if step.sums is not None else torch.zeros(len(step.keys), len(self.layers), 3)
        for i, key in enumerate(step.keys):
            if replies[i] == 0:
                continue
            total = self.totals.setdefault(key, torch.zeros(len(self.layers), 4, dtype=torch.float64))
            total[:, :3] += sums[i].double()
            total[:, 3] += float(replies[i])


class ActivationRecorder:
    """Each request's residual stream at `layers`, summed in float32 over the rows of its span, inside the
    engine: the per-reply means of the activations stage without a second model.

    A request asks for it with `sampling_params(key, span)`. `span=(start, end)` are token positions of
    the request's sequence; `start=None` is the prompt's length (the reply as it is generated, i.e. the
    generated tokens fed back: all but the last), `end=None` no end. vLLM schedules a request's tokens
    in order (prefill, chunked or not, then one token per decode step), so its rows in a step are
    consecutive positions and the span's rows are one range, gathered for all requests with one
    `index_add_` per layer. The sums live in the workers (every tensor-parallel rank holds the whole
    stream; rank 0 answers `pop`), on the model's device until `pop` copies them out.

    `stop_early` (prefill-only extraction, whose sampled token is thrown away) runs the model only up to
    the last recorded layer: the decoder loop's `end_layer` is set below the model's, so later blocks do
    not run (the final norm and the LM head still do, on a stream nobody reads).
    """

    def __init__(self, llm, layers: Sequence[int], stop_early: bool = False):
        self.llm, self.layers = llm, list(layers)
        self.n_blocks, self.hidden_size = llm.collective_rpc(_install_recorder, args=(self.layers, stop_early))[0]

    def sampling_params(self, key: str, span: tuple[int | None, int | None] = (None, None), **sampling):
        from vllm import SamplingParams

        extra = {EXTRA_ARGS_KEY: {"key": key, "span": list(span)}}
        return SamplingParams(**sampling, extra_args=extra)

    def pop(self, keys: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Float32 means [len(keys), layers, hidden] (NaN where nothing was recorded) and each key's row count."""
        replies = self.llm.collective_rpc(_pop_recorded, args=(list(keys),))
        return next(reply for reply in replies if reply is not None)

    def remove(self) -> None:
        self.llm.collective_rpc(_remove_recorder)


class _WorkerRecorder:
    """The worker's half of `ActivationRecorder`: hooks, the routed forward and the running sums.

    The sums stay on the model's device, one slot [layers, hidden] per request until it is popped: a
    decode step of 256 requests at 64 layers x 5120 would otherwise copy 335 MB to the host every step.
    """

    def __init__(self, runner, layers: list[int], stop_early: bool):
        self.runner, self.layers = runner, layers
        blocks = find_blocks(runner.get_model())
        check_layers(layers, len(blocks), "activations", "layers")
        self.n_blocks, self.hidden_size = len(blocks), int(runner.model_config.get_hidden_size())
        self.sums: torch.Tensor | None = None  # [slots, layers, hidden] float32, on the device
        self.slots: dict[str, int] = {}  # key -> its slot
        self.free: list[int] = []
        self.counts: dict[str, int] = {}
        self.step: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's span rows and their slots
        self.handles = [blocks[layer].register_forward_hook(self._hook(slot)) for slot, layer in enumerate(layers)]
        self.forward = runner._model_forward
        runner._model_forward = self._routed_forward
        # The decoder loop runs blocks [start_layer, end_layer) (vLLM's pipeline-parallel slicing).
        self.inner = next((m for m in runner.get_model().modules() if getattr(m, "layers", None) is blocks), None)
        self.end_layer = None
        if stop_early and getattr(self.inner, "end_layer", None) == len(blocks):
            self.end_layer = self.inner.end_layer
            self.inner.end_layer = max(layers) + 1

    def remove(self) -> None:
        self.runner._model_forward = self.forward
        for handle in self.handles:
            handle.remove()
        if self.end_layer is not None:
            self.inner.end_layer = self.end_layer
        self.sums = None

    def _routed_forward(self, *args, **kwargs):
        self.step = self._route(kwargs.get("positions"))
        try:
            return self.forward(*args, **kwargs)
        finally:
            self.step = None

    def _slot(self, key: str, device: torch.device) -> int:
        if key in self.slots:
            return self.slots[key]
        if not self.free:  # grow by doubling: rare, and the old sums are kept
            old = 0 if self.sums is None else len(self.sums)
            grown = torch.zeros(max(2 * old, 16), len(self.layers), self.hidden_size, device=device)
            if self.sums is not None:
                grown[:old] = self.sums
            self.sums, self.free = grown, list(range(len(grown) - 1, old - 1, -1))
        self.slots[key] = self.free.pop()
        return self.slots[key]

    def _route(self, positions: torch.Tensor | None):
        if self.runner.input_batch.num_reqs == 0 or positions is None or positions.dim() != 1:
            return None
        starts, requests = _scheduled(self.runner)
        device = positions.device
        firsts = positions[torch.tensor(starts[:-1], device=device)].tolist()  # each request's first position
        rows, owners = [], []
        for i, (_, extra, prompt_len) in enumerate(requests):
            if not extra or "span" not in extra:
                continue
            start, end = extra["span"]
            start = prompt_len if start is None else start
            end = math.inf if end is None else end
            a = starts[i] + max(0, start - firsts[i])
            b = starts[i] + min(starts[i + 1] - starts[i], end - firsts[i])
            if b > a:
                a, b, key = int(a), int(b), extra["key"]
                rows.append(torch.arange(a, b))
                owners.append(torch.full((b - a,), self._slot(key, device)))
                self.counts[key] = self.counts.get(key, 0) + b - a
        if not rows:
            return None
        return torch.cat(rows).to(device), torch.cat(owners).to(device)

    def _hook(self, slot: int):
        def hook(_module, _args, output):
            if self.step is None:
                return None
            rows, owners = self.step
            hidden, residual = output if isinstance(output, tuple) else (output, None)
            picked = hidden[rows].float()
            if residual is not None:
                picked += residual[rows].float()
            self.sums[:, slot].index_add_(0, owners, picked)
            return None

        return hook

    def pop(self, keys: list[str]) -> tuple[torch.Tensor, list[int]]:
        means = torch.full((len(keys), len(self.layers), self.hidden_size), float("nan"))
        counts = [self.counts.pop(key, 0) for key in keys]
        held = [(i, self.slots.pop(key)) for i, key in enumerate(keys) if key in self.slots]
        if held:
            index = torch.tensor([slot for _, slot in held], device=self.sums.device)
            with torch.inference_mode():  # the sums were made in the engine's inference mode
                sums = self.sums[index].cpu()  # one copy for all of them
                self.sums[index] = 0.0
            for (i, slot), total in zip(held, sums, strict=True):
                means[i] = total / counts[i]
                self.free.append(slot)
        return means, counts


def _install_recorder(worker, layers: list[int], stop_early: bool) -> tuple[int, int]:
    if getattr(worker, "_axis_recorder", None) is not None:
        raise RuntimeError("an ActivationRecorder is already installed in this engine")
    worker._axis_recorder = _WorkerRecorder(worker.model_runner, layers, stop_early)
    return worker._axis_recorder.n_blocks, worker._axis_recorder.hidden_size


def _pop_recorded(worker, keys: list[str]):
    recorded = worker._axis_recorder.pop(keys)
    return recorded if getattr(worker, "rank", 0) == 0 else None


def _remove_recorder(worker) -> None:
    if getattr(worker, "_axis_recorder", None) is not None:
        worker._axis_recorder.remove()
        worker._axis_recorder = None


def _floats(values: torch.Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in values]
