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
that stopped at its end-of-turn token (which is not counted, even where async scheduling feeds it
back), all but the last of one cut by `max_tokens`; each position once, also when a preempted request
is recomputed (`engine.count_once`). What the hooks read from vLLM's model runner is in
`engines.vllm.engine`, which pins Model Runner V1. Capped and uncapped requests share one batch; the cost is one
add per edited layer and token, and a gather/scatter per setting present in the step.

Tensor parallel: after each block's all-reduce every rank holds the whole stream, so the hooks live in
every worker (installed through `collective_rpc`, as the recorder's are), every rank applies the same
edit to the same rows, and rank 0 alone measures; its per-request sums come back to the engine's
process with one call per step (`EngineHooks.collect`). Needs the engine core in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, which `hooked_engine` sets; with tensor parallel 1 the model is
here too) and eager mode: CUDA graphs replay captured kernels and would skip Python hooks (capturing
the edits into the graph would need them written as custom ops).

>>> llm = hooked_engine(vllm_engine_args("results/models/smollm2-135m-instruct", {}, "serve"))
>>> hooks = EngineHooks(llm, units, [20, 24], {"none": [], "late-p25": [capping]})
>>> prompts = [hooks.prompt("late-p25", ids) for ids in token_ids]
>>> out = llm.generate(prompts, [hooks.sampling_params("late-p25", key, max_tokens=64) for key in keys])
>>> hooks.pop(keys[0]).projection
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from assistant_axis.cap import CappingConfig
from assistant_axis.engines.vllm.engine import EXTRA_ARGS_KEY, V1Runner, count_once
from assistant_axis.errors import InputError
from assistant_axis.interventions import Intervention, check_fit
from assistant_axis.models import check_layers, find_blocks

__all__ = ["Telemetry", "EngineHooks", "ActivationRecorder", "EXTRA_ARGS_KEY"]


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


class EngineHooks:
    """Per-request interventions (`settings`: name -> interventions, applied in order) and telemetry on
    `layers` (unit axis rows `units` [len(layers), hidden]) in a vLLM engine from `hooked_engine`.

    The hooks live in every worker (`_WorkerHooks`, one per tensor-parallel rank, each applying the same
    edits to its copy of the stream); rank 0 also measures. Its sums reach this process with `collect`,
    one call into the workers for all requests (after each engine step, for streaming); `pop` collects.
    """

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
        self.totals: dict[str, torch.Tensor] = {}  # key -> [layers, 4]: sums and the token count
        replies = llm.collective_rpc(_install_hooks, args=(units.float(), self.layers, self.settings))
        self.n_blocks = replies[0]

    # ------------------------------------------------------------------ requests

    def sampling_params(self, setting: str, key: str, **sampling):
        """`SamplingParams` for one request under `setting`, its telemetry filed under `key`."""
        # vLLM loads only where an engine runs: planning and the light paths never import it
        from vllm import SamplingParams

        if setting not in self.settings:
            raise InputError("request", "capping", f"unknown setting {setting!r} (known: {', '.join(self.settings)})")
        return SamplingParams(**sampling, extra_args={EXTRA_ARGS_KEY: {"setting": setting, "key": key}})

    @staticmethod
    def prompt(setting: str, token_ids: Sequence[int]) -> dict:
        """The prompt of a request under `setting`. Prefix caching shares KV blocks between requests whose
        tokens agree; a block computed under one setting holds that setting's edited stream, so the cache
        is salted per setting (requests under the same setting still share)."""
        return {"prompt_token_ids": list(token_ids), "cache_salt": f"setting:{setting}"}

    def collect(self, forget: Sequence[str] = ()) -> None:
        """Add what rank 0 measured since the last call to each request's totals; then the workers forget
        the requests filed under `forget` (finished: their keys may come again)."""
        replies = self.llm.collective_rpc(_collect_telemetry, args=(list(forget),))
        for key, sums in next(r for r in replies if r is not None).items():
            total = self.totals.setdefault(key, torch.zeros(len(self.layers), 4, dtype=torch.float64))
            total += sums

    def pop(self, key: str) -> Telemetry:
        """The telemetry of the request filed under `key` (forgotten afterwards)."""
        self.collect(forget=[key])
        return self._telemetry(self.totals.pop(key, None))

    def peek(self, key: str) -> Telemetry:
        """The telemetry so far of a request still running, as of the last `collect`."""
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
        self.llm.collective_rpc(_remove_hooks)


@dataclass
class _Step:
    """Who owns which rows of one engine step."""

    n_tokens: int
    keys: list[str]  # one per request slot
    slot: torch.Tensor  # [n_tokens] request slot of each row
    reply: torch.Tensor  # [n_tokens] bool: the row is a reply token to measure
    rows: dict[str, torch.Tensor]  # setting -> its rows
    last: dict[str, torch.Tensor]  # setting -> its rows at the prompt's last position or past it
    sums: torch.Tensor | None = None  # [slots, layers, 3]: projection, fired, correction sums


class _WorkerHooks:
    """The worker's half of `EngineHooks`: the routed forward, the layer hooks and rank 0's running sums.

    Interventions and axis rows are placed on the model's device once, here.
    """

    def __init__(self, worker, units: torch.Tensor, layers: list[int], settings: dict[str, list[Intervention]]):
        self.runner = V1Runner(worker.model_runner)
        model = self.runner.model()
        blocks, device = find_blocks(model), next(model.parameters()).device
        check_layers(layers, len(blocks), "layers", "layers")
        size = self.runner.hidden_size()
        if units.shape[-1] != size:
            raise InputError("axis", "hidden_size", f"axis has hidden size {units.shape[-1]}, the model has {size}")
        check_fit([i for ivs in settings.values() for i in ivs], len(blocks), size)
        self.n_blocks, self.layers = len(blocks), layers
        self.measures = getattr(worker, "rank", 0) == 0  # every rank holds the same stream: one measures
        self.settings = {name: [iv.to(device) for iv in ivs] for name, ivs in settings.items()}
        # Settings with an edit at the last position only (`--steer-positions last`): the rows it acts on
        # are worked out per step for these alone.
        self.positional = {
            name for name, ivs in self.settings.items() if any(getattr(iv, "positions", "all") != "all" for iv in ivs)
        }
        self.units = units.to(device)
        self.step: _Step | None = None
        self.pending: dict[str, torch.Tensor] = {}  # key -> [layers, 4] sums not yet collected
        self.seen: dict[str, int] = {}  # key -> one past the last position run (a preempted request runs them again)
        edits: dict[int, list[tuple[str, Intervention, int]]] = {}
        for name, interventions in self.settings.items():
            for intervention in interventions:
                for k, layer in enumerate(intervention.layers):
                    edits.setdefault(layer, []).append((name, intervention, k))
        watched = set(layers) if self.measures else set()
        self.handles = []
        for layer in sorted(watched | set(edits)):
            monitored = layers.index(layer) if layer in watched else None
            self.handles.append(blocks[layer].register_forward_hook(self._hook(edits.get(layer, []), monitored)))
        self.runner.wrap_forward(self._routed)

    def remove(self) -> None:
        self.runner.unwrap()
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def collect(self, forget: list[str]) -> dict[str, torch.Tensor] | None:
        pending, self.pending = self.pending, {}
        for key in forget:
            self.seen.pop(key, None)
        return pending if self.measures else None

    def _routed(self, forward):
        def routed_forward(*args, **kwargs):
            self.step = self._route(kwargs.get("input_ids"), kwargs.get("positions"))
            try:
                out = forward(*args, **kwargs)
                self._file(self.step)
                return out
            finally:
                self.step = None

        return routed_forward

    def _route(self, input_ids, positions) -> _Step | None:
        requests = self.runner.scheduled(input_ids, positions)
        if not requests:
            return None
        n_tokens = requests[-1].end
        device = positions.device
        keys, rows, last = [], {}, {}
        reply = torch.zeros(n_tokens, dtype=torch.bool)
        for request in requests:
            extra = request.extra
            setting, key = (extra.get("setting"), extra["key"]) if extra else (None, request.req_id)
            keys.append(key)
            a, b = count_once(self.seen, key, request, request.prompt_len, math.inf)
            reply[a:b] = True
            if setting in self.settings and self.settings[setting]:
                rows.setdefault(setting, []).append(torch.arange(request.start, request.end))
            if setting in self.positional:
                # "Last position" edits act on the prompt's last token and each token after it: in a
                # chunked prefill a chunk's last row is not the prompt's last.
                first = request.start + max(0, request.prompt_len - 1 - request.first)
                last.setdefault(setting, []).append(torch.arange(min(first, request.end), request.end))
        counts = torch.tensor([request.end - request.start for request in requests])
        slot = torch.repeat_interleave(torch.arange(len(requests)), counts).to(device)
        rows = {setting: torch.cat(parts).to(device) for setting, parts in rows.items()}
        last = {setting: torch.cat(parts).to(device) for setting, parts in last.items()}
        return _Step(n_tokens, keys, slot, reply.to(device), rows, last)

    def _hook(self, edits: list[tuple[str, Intervention, int]], monitored: int | None):
        unit = self.units[monitored] if monitored is not None else None

        def hook(_module, _args, output):
            step = self.step
            if step is None:
                return None
            hidden, residual = output
            n = step.n_tokens
            acting = [(name, iv, k) for name, iv, k in edits if name in step.rows]
            stream = hidden + residual if residual is not None else hidden
            # Per setting, its rows' projection just before its first cap here: what firing is measured
            # against (the setting's own steering before it is not firing; another setting's is not its).
            # Each is taken from a projection of all n rows, as `after` is: a row no cap changed then gives
            # the same bits twice (a product over fewer rows may round differently), so it never counts.
            before: dict[str, torch.Tensor] = {}
            if acting:
                stream = stream.clone()
                for name, intervention, k in acting:
                    rows = step.rows[name]
                    if unit is not None and name not in before and isinstance(intervention, CappingConfig):
                        before[name] = (stream[:n].float() @ unit)[rows]
                    if getattr(intervention, "positions", "all") == "all":
                        stream[rows] = intervention.edit(k, stream[rows])
                    else:  # each row at or past the prompt's last position is the last of its own pass
                        rows = step.last[name]
                        stream[rows] = intervention.edit(k, stream[rows].unsqueeze(-2)).squeeze(-2)
            if unit is not None:
                after = stream[:n].float() @ unit
                change = torch.zeros_like(after)
                for name, projection in before.items():
                    rows = step.rows[name]
                    change[rows] = after[rows] - projection
                change = change * step.reply
                values = torch.stack([after * step.reply, (change != 0).float(), change], dim=-1)
                if step.sums is None:
                    step.sums = torch.zeros(len(step.keys), len(self.layers), 3, device=stream.device)
                step.sums[:, monitored].index_add_(0, step.slot, values)
            if not acting:
                return None
            return stream, torch.zeros_like(residual) if residual is not None else None

        return hook

    def _file(self, step: _Step | None) -> None:
        """Add one step's sums to each request's pending sums (on the host: one copy per step)."""
        if step is None or not self.measures:
            return
        replies = torch.zeros(len(step.keys)).index_add_(0, step.slot.cpu(), step.reply.cpu().float())
        sums = step.sums.cpu() if step.sums is not None else torch.zeros(len(step.keys), len(self.layers), 3)
        for i, key in enumerate(step.keys):
            if replies[i] == 0:
                continue
            total = self.pending.setdefault(key, torch.zeros(len(self.layers), 4, dtype=torch.float64))
            total[:, :3] += sums[i].double()
            total[:, 3] += float(replies[i])


def _install_hooks(worker, units, layers, settings) -> int:
    if getattr(worker, "_axis_hooks", None) is not None:
        raise RuntimeError("EngineHooks are already installed in this engine")
    worker._axis_hooks = _WorkerHooks(worker, units, layers, settings)
    return worker._axis_hooks.n_blocks


def _collect_telemetry(worker, forget: list[str]):
    return worker._axis_hooks.collect(forget)


def _remove_hooks(worker) -> None:
    if getattr(worker, "_axis_hooks", None) is not None:
        worker._axis_hooks.remove()
        worker._axis_hooks = None


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
        # vLLM loads only where an engine runs: planning and the light paths never import it
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
        self.runner, self.layers = V1Runner(runner), layers
        blocks = find_blocks(self.runner.model())
        check_layers(layers, len(blocks), "activations", "layers")
        self.n_blocks, self.hidden_size = len(blocks), self.runner.hidden_size()
        self.sums: torch.Tensor | None = None  # [slots, layers, hidden] float32, on the device
        self.slots: dict[str, int] = {}  # key -> its slot
        self.free: list[int] = []
        self.counts: dict[str, int] = {}
        self.seen: dict[str, int] = {}  # key -> one past the last position run (a preempted request runs them again)
        self.step: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's span rows and their slots
        self.handles = [blocks[layer].register_forward_hook(self._hook(slot)) for slot, layer in enumerate(layers)]
        self.runner.wrap_forward(self._routed)
        # The decoder loop runs blocks [start_layer, end_layer) (vLLM's pipeline-parallel slicing).
        self.inner = next((m for m in self.runner.model().modules() if getattr(m, "layers", None) is blocks), None)
        self.end_layer = None
        if stop_early and getattr(self.inner, "end_layer", None) == len(blocks):
            self.end_layer = self.inner.end_layer
            self.inner.end_layer = max(layers) + 1

    def remove(self) -> None:
        self.runner.unwrap()
        for handle in self.handles:
            handle.remove()
        if self.end_layer is not None:
            self.inner.end_layer = self.end_layer
        self.sums = None

    def _routed(self, forward):
        def routed_forward(*args, **kwargs):
            self.step = self._route(kwargs.get("input_ids"), kwargs.get("positions"))
            try:
                return forward(*args, **kwargs)
            finally:
                self.step = None

        return routed_forward

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

    def _route(self, input_ids, positions):
        rows, owners = [], []
        for request in self.runner.scheduled(input_ids, positions):
            if not request.extra or "span" not in request.extra:
                continue
            key = request.extra["key"]
            start, end = request.extra["span"]
            start = request.prompt_len if start is None else start
            end = math.inf if end is None else end
            a, b = count_once(self.seen, key, request, start, end)
            if b > a:
                rows.append(torch.arange(a, b))
                owners.append(torch.full((b - a,), self._slot(key, positions.device)))
                self.counts[key] = self.counts.get(key, 0) + b - a
        if not rows:
            return None
        return torch.cat(rows).to(positions.device), torch.cat(owners).to(positions.device)

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
        for key in keys:
            self.seen.pop(key, None)
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
