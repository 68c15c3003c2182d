"""Sessions in one vLLM engine: many requests at once, each under its own setting.

One thread owns the engine: it adds submitted requests, steps the engine (continuous batching: every
running request advances by a token per step) and hands each request's new text to its caller as it
grows. Settings are the interventions a request may ask for by name: `"none"` and one per loaded
capping config (its file's stem, e.g. `late-p25`), each after the session's steering if any; requests
of different settings share a batch (see `hooks`). A reply's projection telemetry is measured while it
is generated, over its fed-back tokens (`hooks.Telemetry`); a conversation's per-message projections
(`conversation_projections`) are recorded in the same engine under the same hooks, teacher-forced.

>>> session = open_engine("vllm", "results/models/smollm2-135m-instruct").session(units, layers, {"late-p25": cap})
>>> reply = session.complete([{"role": "user", "content": "Who are you?"}], setting="late-p25")
>>> reply.projection, reply.fired
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from assistant_axis.cap import CappingConfig
from assistant_axis.engines import Chunk, Conversation, Reply, Sampling, TokenLogprob, check_context
from assistant_axis.engines.vllm.engine import EXTRA_ARGS_KEY
from assistant_axis.engines.vllm.hooks import EngineHooks, Telemetry
from assistant_axis.engines.vllm.ops import Layout, settings_stages
from assistant_axis.errors import InputError
from assistant_axis.project import projection_frame
from assistant_axis.steer import Steering
from assistant_axis.templates import ChatTemplate, split_reasoning

__all__ = ["ReplyStream", "VLLMSession", "SPARE_SETTINGS"]

SPARE_SETTINGS = 4  # settings an engine started for a session has room for beyond those it starts with


class ReplyStream:
    """One request's events: `Chunk`s, then its `Reply` (or an exception). Read from a thread (`result`)
    or from an event loop (`async for`); `cancel` stops its generation."""

    def __init__(self, session: VLLMSession, key: str, loop: asyncio.AbstractEventLoop | None):
        self.session, self.key, self.loop = session, key, loop
        self.events: asyncio.Queue | queue.Queue = asyncio.Queue() if loop else queue.Queue()

    def put(self, event) -> None:
        if self.loop:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        else:
            self.events.put(event)

    def result(self) -> Reply | Telemetry:
        """The reply (the `Telemetry` of a measured span)."""
        while not isinstance(event := self.events.get(), (Reply, Telemetry, BaseException)):
            pass
        if isinstance(event, BaseException):
            raise event
        return event

    async def __aiter__(self):
        while True:
            event = await self.events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Reply):
                return

    def cancel(self) -> None:
        """Stop generating; nothing more arrives (the caller has gone)."""
        self.session.cancel(self.key)

    def finish(self) -> None:
        """Stop generating now; the reply so far arrives, ending with "length" (a time limit, a shutdown)."""
        self.session.inbox.put(("finish", self.key))


@dataclass
class _Running:
    stream: ReplyStream
    setting: str
    prompt_tokens: int
    top_logprobs: int | None
    salt: str | None = None  # its own prefix-cache salt (a measured span must compute every token)
    measured_only: bool = False  # a span measured, not a reply: its stream ends with the `Telemetry`
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)


class VLLMSession(Conversation):
    """A vLLM engine with the axis's hooks, and the conversation state `chat` keeps (see `Conversation`)."""

    def __init__(
        self,
        llm,
        template: ChatTemplate,
        units: torch.Tensor,
        layers: list[int],
        cappings: dict[str, CappingConfig],
        steering: Steering | None = None,
        sampling: Sampling | None = None,
        system: str | None = None,
        default_setting: str | None = None,
    ):
        self.llm, self.template, self.layers, self.units = llm, template, list(layers), units
        self.tokenizer = template.tokenizer
        self.cappings, self.steering = cappings, steering
        self.sampling = sampling or Sampling(temperature=0.7, top_p=0.9, max_tokens=256)
        before = [steering] if steering else []
        settings = {"none": before, **{name: [*before, c] for name, c in cappings.items()}}
        self.settings = list(settings)
        self.default_setting = default_setting or (next(iter(cappings)) if cappings else "none")
        self.hooks = EngineHooks(llm, units, self.layers, settings)
        self.engine = llm.llm_engine
        self.context_length = int(self.engine.model_config.max_model_len)
        self.inbox: queue.Queue = queue.Queue()
        self.running: dict[str, _Running] = {}
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="vllm-engine", daemon=True)
        self.thread.start()
        self.system, self.messages = system, []
        self.reset()

    @staticmethod
    def layout(layers: list[int], cappings: dict[str, CappingConfig], steering: Steering | None) -> Layout:
        """The ops an engine for these settings carries: edits where a setting acts, telemetry on `layers`,
        room for `SPARE_SETTINGS` settings more (`add_setting`)."""
        before = [steering] if steering else []
        settings = [[*before, capping] for capping in cappings.values()] or [before]
        edit = sorted({layer for interventions in settings for iv in interventions for layer in iv.layers})
        stages = max((len(at) for ivs in settings for at in settings_stages(ivs).values()), default=1)
        return Layout(edit=edit, measure=list(layers), settings=len(cappings) + 1 + SPARE_SETTINGS, stages=stages)

    def add_setting(self, name: str, capping: CappingConfig) -> None:
        """Another capping setting, used by requests from now on (its layers must carry edit ops)."""
        capping = capping.normalized()
        self._call(lambda: self.hooks.add_setting(name, [*([self.steering] if self.steering else []), capping]))
        self.cappings[name] = capping
        self.settings.append(name)

    @property
    def capping(self) -> CappingConfig | None:  # what `chat` describes: the default setting's cap
        return self.cappings.get(self.default_setting)

    def tau(self, setting: str | None = None) -> list[float | None] | None:
        capping = self.cappings.get(setting or self.default_setting)
        return None if capping is None else capping.floors(self.layers)

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        messages: Sequence[dict],
        sampling: Sampling | None = None,
        top_logprobs: int | None = None,
        setting: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> ReplyStream:
        """Start generating the next assistant turn of `messages`; its events arrive on the returned stream."""
        if self.closed:
            raise RuntimeError("the engine is shut down")
        setting = setting or self.default_setting
        sampling = sampling or self.sampling
        key = f"axis-{uuid.uuid4().hex}"
        prompt = self.template.ids(self.template.fit(list(messages)), add_generation_prompt=True)
        check_context(len(prompt), sampling.max_tokens, self.context_length)
        params = self.hooks.sampling_params(setting, key, **self._sampling_kwargs(sampling, top_logprobs))
        stream = ReplyStream(self, key, loop)
        self.inbox.put(("add", key, prompt, params, _Running(stream, setting, len(prompt), top_logprobs)))
        return stream

    def complete(
        self,
        messages: Sequence[dict],
        sampling: Sampling | None = None,
        top_logprobs: int | None = None,
        setting: str | None = None,
    ) -> Reply:
        return self.submit(messages, sampling, top_logprobs, setting).result()

    # ------------------------------------------------------------------ many replies (evaluate, drift)

    def answer(
        self, requests: dict[str, list[list[dict]]], sampling: Sampling, measure: bool = True
    ) -> dict[str, list[Reply]]:
        """Each setting's conversations (`requests`: setting -> conversations), their next turns all submitted
        at once and generated in shared batches; the telemetry comes with them (`measure` changes nothing)."""
        streams = {s: [self.submit(c, sampling, setting=s) for c in convs] for s, convs in requests.items()}
        return {setting: [stream.result() for stream in pending] for setting, pending in streams.items()}

    def conversation_projections(self, messages: list[dict], setting: str | None = None):
        """Per message, its mean projection per layer in the conversation up to it (as `project` computes
        it), under the setting's interventions: one prefill-only request per message, measured over the
        message's tokens (its telemetry span, after the setting's edits). A frame of `turn, role, layer,
        projection, n_chars`."""
        # vLLM loads only where an engine runs: planning and the light paths never import it
        from vllm import SamplingParams

        setting = setting or self.default_setting
        if setting not in self.settings:
            raise InputError("request", "capping", f"unknown setting {setting!r} (known: {', '.join(self.settings)})")
        shown = self.template.fit(list(messages))
        located = [self.template.turn_span(shown[:i], m) for i, m in enumerate(shown)]
        todo = [i for i, (_, start, end) in enumerate(located) if end > start]
        streams = []
        for i in todo:
            ids, start, end = located[i]
            key = f"axis-turn-{uuid.uuid4().hex}"
            extra = {EXTRA_ARGS_KEY: {"setting": setting, "key": key, "span": [start, end]}}
            params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args=extra)
            stream = ReplyStream(self, key, None)
            # Its own cache salt: every token of the message is computed, none read from the cache.
            running = _Running(stream, setting, len(ids), None, salt=key, measured_only=True)
            self.inbox.put(("add", key, ids, params, running))
            streams.append(stream)
        values = torch.full((len(shown), len(self.layers)), float("nan"))
        for stream, i in zip(streams, todo, strict=True):
            telemetry, (_, start, end) = stream.result(), located[i]
            if telemetry.tokens != end - start:
                raise RuntimeError(f"message {i}: {telemetry.tokens} of its {end - start} tokens were measured")
            values[i] = torch.tensor([float("nan") if v is None else v for v in telemetry.projection])
        return projection_frame(shown, self.layers, values)

    def _call(self, work):
        """`work()` run on the engine thread between two steps (the workers' hooks are not to be touched
        while a step runs); its result or its exception."""
        if self.closed:
            raise RuntimeError("the engine is shut down")
        future: Future = Future()
        self.inbox.put(("call", work, future))
        return future.result()

    # ------------------------------------------------------------------ a server's requests

    def _submit_cut(self, messages, sampling: Sampling, top_logprobs, setting, cut) -> ReplyStream:
        stream = self.submit(messages, sampling, top_logprobs, setting, asyncio.get_running_loop())
        cut.on(stream.finish)  # a time limit or shutdown finishes the reply where it is
        return stream

    async def replies(self, messages, sampling: Sampling, seeds, top_logprobs, setting, cut) -> list[Reply]:
        """A server's request: one reply per seed, all in the engine at once."""
        streams = [self._submit_cut(messages, replace(sampling, seed=s), top_logprobs, setting, cut) for s in seeds]
        try:
            return [await _last(stream) for stream in streams]
        finally:  # a client that went away: its generations stop
            for stream in streams:
                stream.cancel()

    def stream(self, messages, sampling: Sampling, top_logprobs, setting, cut):
        """A server's streamed request: `Chunk`s with the running telemetry, then the `Reply`."""
        stream = self._submit_cut(messages, sampling, top_logprobs, setting, cut)  # refused now, not mid-stream

        async def events():
            try:
                async for event in stream:
                    yield event
            finally:
                stream.cancel()

        return events()

    def cancel(self, key: str) -> None:
        self.inbox.put(("abort", key))

    def close(self) -> None:
        """Stop the engine thread (running replies end with an error), remove the hooks."""
        if not self.closed:
            self.closed = True
            self.inbox.put(("close",))
            self.thread.join()
            self.hooks.remove()

    @staticmethod
    def _sampling_kwargs(sampling: Sampling, top_logprobs: int | None) -> dict:
        # vLLM loads only where an engine runs: planning and the light paths never import it
        from vllm.sampling_params import RequestOutputKind

        return {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "seed": sampling.seed,
            "logprobs": top_logprobs,
            "output_kind": RequestOutputKind.DELTA,
        }

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                try:
                    # Block while there is nothing to step; otherwise take what arrived and step on.
                    message = self.inbox.get(block=idle)
                except queue.Empty:
                    message = None
                while message is not None:
                    if message[0] == "close":
                        raise _Closed
                    self._handle(message)
                    try:
                        message = self.inbox.get_nowait()
                    except queue.Empty:
                        message = None
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self.hooks.collect()  # the step's telemetry, for the chunks streamed below
                    for output in outputs:
                        self._deliver(output)
        except _Closed:
            self._fail_all(RuntimeError("the engine was shut down"))
        except BaseException as exc:  # the engine failed: every caller hears it
            self.closed = True
            self._fail_all(exc)

    def _handle(self, message) -> None:
        if message[0] == "call":  # work on the engine's workers between two steps (see `_call`)
            _, work, future = message
            try:
                future.set_result(work())
            except BaseException as exc:  # noqa: BLE001 (handed to the caller)
                future.set_exception(exc)
            return
        if message[0] in ("abort", "finish"):
            running = self.running.pop(message[1], None)
            if running is not None:
                self.engine.abort_request([message[1]])
                telemetry = self.hooks.pop(message[1])
                if message[0] == "finish":
                    running.stream.put(self._reply(running, telemetry, "length", running.tokens, running.logprobs))
            return
        _, key, prompt, params, running = message
        prompt = self.hooks.prompt(running.setting, prompt)
        if running.salt:
            prompt["cache_salt"] = running.salt
        try:
            self.engine.add_request(key, prompt, params)
        except Exception as exc:  # vLLM refused it (e.g. too long for the model): only this caller hears it
            running.stream.put(exc)
            return
        self.running[key] = running

    def _deliver(self, output) -> None:
        running = self.running.get(output.request_id)
        if running is None:
            return
        step = output.outputs[0]
        running.tokens += list(step.token_ids)
        running.text += step.text
        if running.top_logprobs is not None and step.logprobs:
            for token, ranked in zip(step.token_ids, step.logprobs, strict=True):
                running.logprobs.append(self._logprob(token, ranked, running.top_logprobs))
        if not output.finished:
            if step.text:
                running.stream.put(Chunk(step.text, self.hooks.peek(output.request_id).as_dict()))
            return
        del self.running[output.request_id]
        telemetry = self.hooks.pop(output.request_id)
        if running.measured_only:
            running.stream.put(telemetry)
            return
        tokens, logprobs = running.tokens, running.logprobs
        finish = "length" if step.finish_reason == "length" else "stop"
        # Ended on an end-of-turn token: the tokenizer's (no stop reason) or one of the model's
        # generation_config (Gemma's <end_of_turn>; vLLM stops on those as stop token ids, naming the id).
        # A stop string would be named as text; the API takes none.
        if finish == "stop" and not isinstance(step.stop_reason, str) and tokens:
            tokens, logprobs = tokens[:-1], logprobs[: len(tokens) - 1]
        if step.text:
            running.stream.put(Chunk(step.text, telemetry.as_dict()))
        running.stream.put(self._reply(running, telemetry, finish, tokens, logprobs))

    def _reply(self, running: _Running, telemetry, finish: str, tokens: list[int], logprobs) -> Reply:
        reasoning, text = split_reasoning(running.text)
        return Reply(
            text,
            finish,
            running.prompt_tokens,
            tokens,
            logprobs if running.top_logprobs is not None else None,
            list(self.layers),
            telemetry.projection,
            self.tau(running.setting),
            reasoning,
            fired=telemetry.fired,
            correction=telemetry.correction,
            setting=running.setting,
            fired_share=self._fired_share(running.setting, telemetry.fired),
        )

    def _fired_share(self, setting: str, fired: list[float | None]) -> float | None:
        """Over the setting's capped layers (each measured over the same tokens), the share of (token,
        layer) pairs its cap changed; None uncapped."""
        capping = self.cappings.get(setting)
        if capping is None:
            return None
        known = [fired[self.layers.index(i)] for i in capping.layers if i in self.layers]
        known = [v for v in known if v is not None]
        return sum(known) / len(known) if known else float("nan")

    def _logprob(self, token: int, ranked: dict, top: int) -> TokenLogprob:
        best = sorted(((lp.rank, i, lp) for i, lp in ranked.items() if lp.rank is not None and lp.rank <= top))
        words = [(lp.decoded_token or self.tokenizer.decode([i]), float(lp.logprob)) for _, i, lp in best]
        chosen = ranked[token]
        return TokenLogprob(token, chosen.decoded_token or self.tokenizer.decode([token]), float(chosen.logprob), words)

    def _fail_all(self, exc: BaseException) -> None:
        for running in self.running.values():
            running.stream.put(exc)
        self.running.clear()


class _Closed(Exception):
    pass


async def _last(stream: ReplyStream) -> Reply:
    async for event in stream:
        if isinstance(event, Reply):
            return event
    raise RuntimeError("the engine ended the request without a reply")
