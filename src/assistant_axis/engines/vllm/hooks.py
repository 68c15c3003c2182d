"""Interventions, projection telemetry and activation recording in a vLLM engine, per request, under
continuous batching: what the engine's process asks of the ops that `worker` placed in the model.

vLLM runs every scheduled request's tokens through the model as one flattened batch `[tokens, hidden]`.
Before each step the workers route its rows: each row's setting (its request's
`SamplingParams.extra_args`), its measurement slot (the request's, for the rows it measures: its reply
as generated, or a given span) and whether it is at its prompt's last position. The ops then edit
each row under its own setting (capped and uncapped requests share a batch, rows no setting edits keep
their values bit for bit) and add each request's telemetry and recorded activations into its slot.
`EngineHooks` writes the settings into the ops' tables and reads the telemetry; `ActivationRecorder`
reads the recorded sums.

A reply's tokens, as measured here, are the generated tokens fed back into the model: all of a reply
that stopped at its end-of-turn token (which is not counted, even where async scheduling feeds it
back), all but the last of one cut by `max_tokens`; each position once, also when a preempted request
is recomputed (`engine.count_once`). What the workers read from vLLM's model runner is in
`engines.vllm.engine`, which pins Model Runner V1.

Tensor parallel: after each block's all-reduce every rank holds the whole stream, so every worker
carries the ops and the same tables, applies the same edit to the same rows, and rank 0 answers for
the sums. Needs the engine core in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, which
`hooked_engine` sets; with tensor parallel 1 the model is here too). Compiled or eager, the same ops run.

>>> args = vllm_engine_args("results/models/smollm2-135m-instruct", {}, "serve")
>>> llm = hooked_engine(args, layout=Layout(edit=[20, 24], measure=[20, 24]))
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

from assistant_axis.engines.vllm.engine import EXTRA_ARGS_KEY
from assistant_axis.errors import InputError
from assistant_axis.interventions import Intervention

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
    `layers` (unit axis rows `units` [len(layers), hidden]) in a vLLM engine from `hooked_engine`,
    whose layout (`worker.Layout`) carries edit ops on the settings' layers and telemetry on `layers`.

    Settings are written into the ops' tables in every worker (one per tensor-parallel rank, each
    applying the same edits to its copy of the stream); rank 0 answers for the sums. `collect` reads every
    request's sums so far (after each engine step, for streaming); `pop` reads one and forgets it.
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
        self.units = units.float()
        self.measured = _call(llm, _measured)
        self.totals: dict[str, Telemetry] = {}
        self._configure()

    def _configure(self) -> None:
        _call(self.llm, _configure, id(self), self.units, self.layers, self.settings)

    def add_setting(self, name: str, interventions: Sequence[Intervention]) -> None:
        """Another setting, applied from the next step on (its layers must carry edit ops)."""
        before = dict(self.settings)
        self.settings[name] = list(interventions)
        try:
            self._configure()
        except Exception:
            self.settings = before
            raise

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

    def collect(self) -> None:
        """Every request's telemetry so far (`peek` reads it)."""
        taken = _call(self.llm, _taken, None, False)
        self.totals = {key: self._telemetry(*value) for key, value in taken.items()}

    def pop(self, key: str) -> Telemetry:
        """The telemetry of the request filed under `key` (forgotten afterwards)."""
        self.totals.pop(key, None)
        return self._telemetry(*_call(self.llm, _taken, [key], True)[key])

    def peek(self, key: str) -> Telemetry:
        """The telemetry so far of a request still running, as of the last `collect`."""
        return self.totals.get(key) or self._telemetry(None, None, 0)

    def _telemetry(self, sums: torch.Tensor | None, _recorded, n: int) -> Telemetry:
        if n == 0 or sums is None:
            none = [None] * len(self.layers)
            return Telemetry(list(self.layers), none, none, none, 0)
        total = sums.double()[[self.measured.index(layer) for layer in self.layers]]
        proj, fired, corr = total[:, 0] / n, total[:, 1], total[:, 2]
        correction = torch.where(fired > 0, corr / fired.clamp(min=1), torch.zeros_like(corr))
        return Telemetry(list(self.layers), _floats(proj), _floats(fired / n), _floats(correction), n)

    def remove(self) -> None:
        """No setting edits anything any more; nothing is measured."""
        _call(self.llm, _configure, None, torch.zeros(0, 1), [], {})


class ActivationRecorder:
    """Each request's residual stream at `layers`, summed in float32 over the rows of its span, inside the
    engine (`record` ops on those layers, see `worker`): the per-reply means of the activations stage
    without a second model.

    A request asks for it with `sampling_params(key, span)`. `span=(start, end)` are token positions of
    the request's sequence; `start=None` is the prompt's length (the reply as it is generated, i.e. the
    generated tokens fed back: all but the last), `end=None` no end. Each request's sums stay in its slot
    on the model's device while it runs (every tensor-parallel rank holds the whole stream; rank 0
    answers `pop`), and move to the host once when it leaves the runner.

    `stop_early` (prefill-only extraction, whose sampled token is thrown away) runs an eager model only up
    to the last recorded layer: later blocks do not run (a compiled model runs the blocks it was traced with).
    """

    def __init__(self, llm, layers: Sequence[int], stop_early: bool = False):
        self.llm, self.layers = llm, list(layers)
        recorded, self.n_blocks, self.hidden_size = _call(llm, _recording, self.layers, stop_early)
        self.index = [recorded.index(layer) for layer in self.layers]

    def sampling_params(self, key: str, span: tuple[int | None, int | None] = (None, None), **sampling):
        # vLLM loads only where an engine runs: planning and the light paths never import it
        from vllm import SamplingParams

        extra = {EXTRA_ARGS_KEY: {"key": key, "span": list(span)}}
        return SamplingParams(**sampling, extra_args=extra)

    def pop(self, keys: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Float32 means [len(keys), layers, hidden] (NaN where nothing was recorded) and each key's row count."""
        taken = _call(self.llm, _taken, list(keys), True, True)
        means = torch.full((len(keys), len(self.layers), self.hidden_size), float("nan"))
        counts = []
        for i, key in enumerate(keys):
            _, sums, n = taken[key]
            counts.append(n)
            if n:
                means[i] = sums[self.index] / n
        return means, counts

    def remove(self) -> None:
        _call(self.llm, _stop_after, None)


def _call(llm, work, *args):
    """`work(worker.axis_ops, *args)` in every worker; rank 0's answer."""
    replies = llm.collective_rpc(_in_worker, args=(work, *args))
    return replies[0]


def _in_worker(worker, work, *args):
    ops = getattr(worker, "axis_ops", None)
    if ops is None:
        raise RuntimeError("this vLLM engine carries no axis ops: start it with hooked_engine or recording_engine")
    return work(ops, *args)


def _measured(ops) -> list[int]:
    return list(ops.measure)


def _configure(ops, owner, units, layers, settings) -> None:
    ops.configure(owner, units, layers, settings)


def _taken(ops, keys, forget, recorded=False):
    return ops.taken(keys, forget, recorded)


def _recording(ops, layers: list[int], stop_early: bool):
    missing = [layer for layer in layers if layer not in ops.record]
    if missing:
        raise InputError("engine layout", "record", f"layers {missing} carry no record op ({ops.record})")
    ops.stop_after(max(layers) if stop_early and layers else None)
    return list(ops.record), ops.n_blocks, ops.hidden_size


def _stop_after(ops, layer) -> None:
    ops.stop_after(layer)


def _floats(values: torch.Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in values]
