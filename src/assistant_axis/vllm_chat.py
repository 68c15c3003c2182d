"""Chat and serve through one vLLM engine: many requests at once, each under its own capping setting.

One thread owns the engine: it adds submitted requests, steps the engine (continuous batching: every
running request advances by a token per step) and hands each request's new text to its caller as it
grows. Settings are the interventions a request may ask for by name: `"none"` and one per loaded
capping config (its file's stem, e.g. `late-p25`), each after the session's steering if any; requests
of different settings share a batch (see `vllm_hooks`). A reply's projection telemetry is measured
while it is generated, over its fed-back tokens (`vllm_hooks.Telemetry`).

>>> session = load_vllm_session("results/models/smollm2-135m-instruct", "results/.../axis.safetensors",
...                             ["results/.../capping/late-p25.safetensors"])
>>> reply = session.complete([{"role": "user", "content": "Who are you?"}], setting="late-p25")
>>> reply.projection, reply.fired
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from assistant_axis.axis import load_axis, unit_rows
from assistant_axis.backends import Sampling
from assistant_axis.cap import CappingConfig
from assistant_axis.chat import Conversation, Reply, TokenLogprob, check_context
from assistant_axis.errors import InputError
from assistant_axis.interop import load_capping
from assistant_axis.steer import Steering
from assistant_axis.templates import ChatTemplate, split_reasoning
from assistant_axis.vllm_engine import hooked_engine, vllm_engine_args
from assistant_axis.vllm_hooks import EngineHooks, Telemetry

__all__ = ["Chunk", "ReplyStream", "VLLMSession", "load_vllm_session"]


@dataclass(frozen=True)
class Chunk:
    """New text of a reply as it is generated, with the reply's running telemetry."""

    text: str
    telemetry: Telemetry


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

    def result(self) -> Reply:
        while not isinstance(event := self.events.get(), (Reply, BaseException)):
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
        self.llm, self.template, self.layers = llm, template, list(layers)
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
        if message[0] in ("abort", "finish"):
            running = self.running.pop(message[1], None)
            if running is not None:
                self.engine.abort_request([message[1]])
                telemetry = self.hooks.pop(message[1])
                if message[0] == "finish":
                    running.stream.put(self._reply(running, telemetry, "length", running.tokens, running.logprobs))
            return
        _, key, prompt, params, running = message
        try:
            self.engine.add_request(key, self.hooks.prompt(running.setting, prompt), params)
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
                running.stream.put(Chunk(step.text, self.hooks.peek(output.request_id)))
            return
        del self.running[output.request_id]
        telemetry = self.hooks.pop(output.request_id)
        tokens, logprobs = running.tokens, running.logprobs
        finish = "length" if step.finish_reason == "length" else "stop"
        # Ended on an end-of-turn token: the tokenizer's (no stop reason) or one of the model's
        # generation_config (Gemma's <end_of_turn>; vLLM stops on those as stop token ids, naming the id).
        # A stop string would be named as text; the API takes none.
        if finish == "stop" and not isinstance(step.stop_reason, str) and tokens:
            tokens, logprobs = tokens[:-1], logprobs[: len(tokens) - 1]
        if step.text:
            running.stream.put(Chunk(step.text, telemetry))
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
        )

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


def load_vllm_session(
    model_path: str,
    axis_path: str,
    cap_paths: Sequence[str] = (),
    steering: Steering | None = None,
    layers: Sequence[int] | None = None,
    dtype: str = "float32",
    sampling: Sampling | None = None,
    system: str | None = None,
    template_options: dict | None = None,
    engine: dict | None = None,
) -> VLLMSession:
    """Check the axis and capping configs against the model's config, then start the engine.

    `engine` holds vLLM settings as the workflow's `generate.vllm` block does (e.g. `max_model_len`,
    `kv_cache_memory_bytes`, `gpu_memory_utilization`). Projection layers default to the union of the
    capped layers, else the axis's middle layer.
    """
    from transformers import AutoConfig

    from assistant_axis.layers import config_dims
    from assistant_axis.models import load_tokenizer

    if not Path(model_path, "config.json").is_file():
        raise InputError(model_path, "config.json", "the vLLM engine needs a model directory (prepare a GGUF first)")
    n_layers, hidden = config_dims(AutoConfig.from_pretrained(model_path))
    axis, axis_layers, meta = load_axis(axis_path, n_layers=n_layers, hidden_size=hidden)
    axis_model = meta.get("model") if isinstance(meta.get("model"), str) and meta.get("model") else None
    cappings = {}
    for path in cap_paths:
        config = load_capping(path, model_name=axis_model, hidden_size=hidden, n_layers=n_layers).normalized()
        cappings[Path(path).stem] = config
    if "none" in cappings:
        raise InputError(cap_paths[list(cappings).index("none")], "name", "'none' names the uncapped setting")
    middle = [axis_layers[len(axis_layers) // 2]]
    capped = sorted(set(itertools.chain.from_iterable(c.layers for c in cappings.values())))
    layers = sorted(set(layers)) if layers else (capped or middle)
    units = unit_rows(axis, axis_layers, layers, hidden, str(axis_path))
    if template_options is None:
        recorded = meta.get("chat_template_kwargs")
        template_options = recorded if isinstance(recorded, dict) else {}
    template = ChatTemplate(load_tokenizer(model_path), template_options, model_path)
    llm = hooked_engine(vllm_engine_args(model_path, engine or {}, "--engine-args", dtype, 0), "--engine vllm")
    return VLLMSession(llm, template, units, layers, cappings, steering, sampling, system)
