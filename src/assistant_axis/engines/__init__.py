"""The runtimes a model runs in, behind two small protocols; nothing outside this package asks which one.

An `Engine` is a model loaded in one runtime. It generates replies to conversations, takes the mean
activation over token spans, and opens a `Session`: the model with the axis's interventions, serving
named settings (`"none"` and one per capping config, each after the session's steering if any):

    Engine.template                                  the chat template every stage renders with
    Engine.generate(conversations, sampling, seeds)  -> [Generation]
    Engine.mean_activations(sequences, spans, layers) -> float32 [n, layers, hidden]
    Engine.context_length                            the most tokens such a sequence may have (None: any)
    Engine.session(units, layers, cappings, steering=None, sampling=None, system=None) -> Session
    Engine.close()

    Session.template, .layers, .settings, .context_length, .sampling
    Session.complete(messages, sampling, top_logprobs, setting) -> Reply      one reply (chat)
    Session.answer({setting: conversations}, sampling, measure) -> {setting: [Reply]}   many (evaluate, drift)
    Session.conversation_projections(messages, setting) -> frame       per message, teacher-forced (project)
    Session.replies(messages, sampling, seeds, top_logprobs, setting, cut)    a server's request (async)
    Session.stream(messages, sampling, top_logprobs, setting, cut)            ... streamed (async events)
    Session.close()

A `Reply`'s projection per session layer is the mean over the reply's tokens under the setting's
interventions; how an engine measures it (a second pass, or while generating) is its own, each said
in its module. One module per runtime: `transformers` (in process, CPU or GPU), `vllm` (a vLLM engine
with the hooks of `engines.vllm.hooks`), `openai` (any OpenAI-compatible server: generation only).

The config's backend names map to engines in `ENGINES`, the one place a name is looked up; what
planning needs from an engine (whether its jobs run the model's weights, take GPUs by tensor
parallel size, send API requests) is declared there, so planning imports no runtime. Where to add an
engine: a module here with a class that has `open` and the methods above, its `EngineSpec` in
`ENGINES`, and its name in the config schema's `backend` enums.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from assistant_axis.errors import InputError
from assistant_axis.templates import split_reasoning

__all__ = [
    "Sampling",
    "Generation",
    "generation",
    "TokenLogprob",
    "Reply",
    "Chunk",
    "check_context",
    "Conversation",
    "Engine",
    "Session",
    "EngineSpec",
    "ENGINES",
    "DEFAULT_ENGINE",
    "engine_spec",
    "open_engine",
]


# ---------------------------------------------------------------------------------------- what engines pass


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    text: str  # the reply, without a thinking model's reasoning
    n_tokens: int  # generated tokens, reasoning included
    finish_reason: str  # "stop" (end of turn) or "length" (max_tokens reached)
    reasoning: str = ""  # the think block's text, if the model wrote one


def generation(text: str, n_tokens: int, finish_reason: str, reasoning: str = "") -> Generation:
    """A `Generation` from generated text: a `<think>` block in it is reasoning, not reply."""
    thought, reply = split_reasoning(text)
    return Generation(reply, n_tokens, finish_reason, (reasoning or thought).strip())


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens at this step, best first


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop" (end of turn) or "length" (max_tokens reached)
    prompt_tokens: int
    token_ids: list[int]  # the generated tokens, without the end-of-turn token
    logprobs: list[TokenLogprob] | None
    layers: list[int]
    projection: list[float | None]  # mean projection per layer; None for an empty reply (or not measured)
    tau: list[float | None] | None  # the capping floor per layer (None where uncapped); None without capping
    reasoning: str = ""  # a thinking model's think block, kept out of `text` and of the projection
    fired: list[float | None] | None = None  # per layer, share of tokens the cap changed (vLLM engine only)
    correction: list[float | None] | None = None  # per layer, mean change of the projection where it did
    setting: str | None = None  # the setting it was generated under ("none" or a capping config's name)
    # Share of (reply token, capped layer) pairs whose projection the setting's cap lifted; None uncapped.
    fired_share: float | None = None


@dataclass(frozen=True)
class Chunk:
    """New text of a reply as it is generated, with the reply's running telemetry (a dict; None where the
    engine measures only once the reply is done)."""

    text: str
    telemetry: dict | None = None


def check_context(prompt_tokens: int, max_tokens: int, context: int | None) -> None:
    """Refuse, before generating, a reply that could not fit the model's context (every engine checks this)."""
    if context is not None and prompt_tokens + max_tokens > context:
        raise InputError(
            "request",
            "max_tokens",
            f"the prompt's {prompt_tokens} tokens + max_tokens {max_tokens} exceed the model's context of "
            f"{context} tokens",
        )


class Conversation:
    """The state `chat` keeps, a system prompt and the turns so far, over any session's `complete`."""

    system: str | None
    messages: list[dict]

    def complete(self, messages: Sequence[dict], sampling: Sampling | None = None, **options) -> Reply:
        raise NotImplementedError

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self.reset()

    def send(self, text: str, sampling: Sampling | None = None) -> Reply:
        """Add a user turn, generate the reply, keep both in the history."""
        reply = self.complete([*self.messages, {"role": "user", "content": text}], sampling)
        answer = {"role": "assistant", "content": reply.text}
        if reply.reasoning:
            answer["reasoning_content"] = reply.reasoning
        self.messages += [{"role": "user", "content": text}, answer]
        return reply


# ------------------------------------------------------------------------------------------- the protocols


class Engine(Protocol):
    template: object  # templates.ChatTemplate
    context_length: int | None

    def generate(
        self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int] | None = None
    ) -> list[Generation]: ...

    def mean_activations(self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], layers): ...

    def session(self, units, layers, cappings: dict, steering=None, sampling=None, system=None) -> Session: ...

    def close(self) -> None: ...


class Session(Protocol):
    template: object
    layers: list[int]
    settings: list[str]
    sampling: Sampling
    context_length: int | None

    def complete(self, messages, sampling=None, top_logprobs=None, setting=None) -> Reply: ...

    def answer(self, requests: dict, sampling: Sampling, measure: bool = True) -> dict[str, list[Reply]]: ...

    def conversation_projections(self, messages: list[dict], setting: str | None = None): ...

    async def replies(self, messages, sampling, seeds, top_logprobs, setting, cut) -> list[Reply]: ...

    def stream(self, messages, sampling, top_logprobs, setting, cut): ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class EngineSpec:
    """What the rest of the package may know about an engine without importing it."""

    module: str  # where its class lives, imported when it is opened
    cls: str
    can: frozenset[str] = field(default_factory=frozenset)  # "generate", "activations", "sessions", "capture"
    runs_weights: bool = True  # its jobs load the model (False: a server elsewhere runs it)
    parallel: bool = False  # its config block's tensor_parallel_size sets a job's GPUs and processes
    block: str | None = None  # the config block of a stage that holds its settings (`generate.vllm`)
    api: bool = False  # it sends requests through the section's OpenAI-compatible API settings


ENGINES: dict[str, EngineSpec] = {
    "transformers": EngineSpec(
        "assistant_axis.engines.transformers",
        "TransformersEngine",
        frozenset({"generate", "activations", "sessions"}),
    ),
    "vllm": EngineSpec(
        "assistant_axis.engines.vllm",
        "VLLMEngine",
        frozenset({"generate", "activations", "sessions", "capture"}),
        parallel=True,
        block="vllm",
    ),
    "openai": EngineSpec(
        "assistant_axis.engines.openai",
        "OpenAIEngine",
        frozenset({"generate"}),
        runs_weights=False,
        block="openai",
        api=True,
    ),
}

# What a stage runs in when its config names no engine (the schema's default).
DEFAULT_ENGINE = "transformers"

WHAT = {
    "generate": "generation",
    "activations": "taking activations",
    "sessions": "interventions (capping, steering)",
    "capture": "recording activations while generating",
}


def engine_spec(name: str, key: str = "backend", needs: Sequence[str] = ()) -> EngineSpec:
    """The engine named `name` in the config key `key`, checked to do what `needs` lists (one clear error)."""
    if name not in ENGINES:
        raise InputError("config", key, f"unknown engine {name!r} (known: {', '.join(ENGINES)})")
    spec = ENGINES[name]
    for need in needs:
        if need not in spec.can:
            able = [n for n, s in ENGINES.items() if need in s.can]
            raise InputError("config", key, f"{name} cannot do {WHAT[need]} (engines that can: {', '.join(able)})")
    return spec


def open_engine(
    name: str,
    model_path: str,
    section: dict | None = None,
    key: str = "engine",
    needs: Sequence[str] = (),
    **options,
) -> Engine:
    """Open the engine `name` for the model at `model_path`. `section` is the config section of the stage
    (each engine reads its own settings from it: `batch_size`, its `vllm` or `openai` block), `key` names
    it in errors; `options` are the model's: `dtype`, `trust_remote_code`, `template_options`,
    `model_name`, and an engine's own (`device`, `capture`, `seed`)."""
    spec = engine_spec(name, f"{key}.backend" if key != "engine" else "--engine", needs)
    engine_class = getattr(importlib.import_module(spec.module), spec.cls)
    return engine_class.open(model_path, section or {}, key, **options)
