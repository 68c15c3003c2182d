"""Talking to a model while watching its projection on the Assistant Axis, optionally capped or steered.

`ChatSession` generates each reply with the steering and capping hooks active and then measures the
reply's mean projection per layer under the same hooks, so a capped reply's projection is the
post-cap one. The reply's tokens are located exactly as the activations stage and `project` locate
them (the rendered conversation, `ChatTemplate.turn_span`). `run_chat` is the terminal loop behind
`assistant-axis chat`; `serve` answers OpenAI-style requests through the same session.

>>> session = load_session("results/models/smollm2-135m-instruct", "results/smollm2-135m-instruct/axis.safetensors",
...                        cap_path="results/smollm2-135m-instruct/capping/late-p25.safetensors")
>>> reply = session.send("Who are you?")
>>> reply.text, reply.projection   # values per layer in session.layers
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import pandas as pd
import torch

from assistant_axis.activations import mean_activations
from assistant_axis.axis import load_axis, unit_rows
from assistant_axis.backends import Sampling, sample_batch
from assistant_axis.cap import CappingConfig
from assistant_axis.errors import InputError
from assistant_axis.interop import load_capping
from assistant_axis.interventions import install
from assistant_axis.models import check_layers, config_dims, hidden_size
from assistant_axis.project import conversation_projections
from assistant_axis.steer import Steering
from assistant_axis.templates import ChatTemplate, split_reasoning

__all__ = [
    "TokenLogprob",
    "Reply",
    "Conversation",
    "ChatSession",
    "load_session",
    "format_projection",
    "run_chat",
    "default_model",
]

BUNDLED_DEFAULT = "bundled:smollm2-135m-instruct"
PREPARED_DEFAULT = "results/models/smollm2-135m-instruct"


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
    projection: list[float | None]  # mean projection per layer; None for an empty reply
    tau: list[float | None] | None  # the capping floor per layer (None where uncapped); None without capping
    reasoning: str = ""  # a thinking model's think block, kept out of `text` and of the projection
    fired: list[float | None] | None = None  # per layer, share of tokens the cap changed (vLLM engine only)
    correction: list[float | None] | None = None  # per layer, mean projection change where it did
    setting: str | None = None  # the capping setting it was generated under ("none" or a config's name)


def check_context(prompt_tokens: int, max_tokens: int, context: int | None) -> None:
    """Refuse, before generating, a reply that could not fit the model's context (every engine checks this)."""
    if context is not None and prompt_tokens + max_tokens > context:
        raise InputError(
            "request",
            "max_tokens",
            f"the prompt's {prompt_tokens} tokens + max_tokens {max_tokens} exceed the model's context of "
            f"{context} tokens",
        )


def default_model() -> str:
    """The workflow's prepared copy of the bundled model when it exists (loads in ~1 s), else the GGUF."""
    return PREPARED_DEFAULT if (Path(PREPARED_DEFAULT) / "config.json").is_file() else BUNDLED_DEFAULT


class Conversation:
    """The state `chat` keeps, a system prompt and the turns so far, over any engine's `complete`."""

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


@dataclass
class ChatSession(Conversation):
    """One transformers model with its axis, optional steering and capping, sampling defaults, and one
    conversation; it generates one reply at a time."""

    model: object
    tokenizer: object
    axis: torch.Tensor  # [n_axis_layers, hidden]
    axis_layers: list[int]
    layers: list[int]  # projection layers
    capping: CappingConfig | None = None
    steering: Steering | None = None
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, top_p=0.9, max_tokens=256))
    system: str | None = None
    axis_source: str = "axis"
    template_options: dict | None = None  # the chat template's options, as the axis's activations used
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.units = unit_rows(self.axis, self.axis_layers, self.layers, hidden_size(self.model), self.axis_source)
        self.template = ChatTemplate(
            self.tokenizer, self.template_options, getattr(self.tokenizer, "name_or_path", "") or "model"
        )
        with self.hooks():  # install() checks sizes and layers on entry: fail now, not mid-chat
            pass
        self.reset()

    @property
    def settings(self) -> list[str]:
        """The capping settings a request may name: "none", and the loaded config's file stem."""
        return ["none"] + ([Path(self.capping.source).stem] if self.capping is not None else [])

    @contextmanager
    def hooks(self, setting: str | None = None) -> Iterator[None]:
        """Steering first, then capping (unless `setting` is "none"): the cap floors the steered stream."""
        if setting is not None and setting not in self.settings:
            raise InputError("request", "capping", f"unknown setting {setting!r} (known: {', '.join(self.settings)})")
        capping = None if setting == "none" else self.capping
        with install(self.model, *(i for i in (self.steering, capping) if i is not None)):
            yield

    # ------------------------------------------------------------------ stateless (serve, project)

    def complete(
        self,
        messages: Sequence[dict],
        sampling: Sampling | None = None,
        top_logprobs: int | None = None,
        setting: str | None = None,
        stop=None,
        on_token=None,
    ) -> Reply:
        """The next assistant turn of `messages`; `top_logprobs` (0-20) asks for per-token logprobs;
        `setting` "none" leaves the capping out; `stop()` and `on_token(id)` as in `backends.sample_batch`
        (a server's time limit, a client gone, a stream)."""
        sampling = sampling or self.sampling
        shown = self.template.fit(list(messages))
        prompt = self.template.ids(shown, add_generation_prompt=True)
        check_context(len(prompt), sampling.max_tokens, self.context_length)
        with self.hooks(setting):
            (out,) = sample_batch(
                self.model, self.tokenizer, [prompt], sampling, sampling.seed, top_logprobs is not None, stop, on_token
            )
            new = out.tokens
            reasoning, text = split_reasoning(self.tokenizer.decode(new, skip_special_tokens=True))
            values = self._reply_projection(shown, text, reasoning)
        logprobs = (
            None
            if top_logprobs is None
            else [self._logprob(token, step, top_logprobs) for token, step in zip(new, out.logits, strict=True)]
        )
        capped = setting != "none" and self.capping is not None
        return Reply(
            text,
            out.finish_reason,
            len(prompt),
            new,
            logprobs,
            list(self.layers),
            values,
            self.tau() if capped else None,
            reasoning,
            setting=self.settings[-1] if capped else "none",
        )

    def tau(self) -> list[float | None] | None:
        return None if self.capping is None else self.capping.floors(self.layers)

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt + reply) the model's positions cover, when its config says."""
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    def conversation_projections(self, messages: list[dict]) -> pd.DataFrame:
        """Per-turn projections (see `project.conversation_projections`) under this session's hooks."""
        with self.hooks():
            return conversation_projections(
                self.model, self.template, messages, self.axis, self.axis_layers, self.layers, source=self.axis_source
            )

    def _logprob(self, token: int, logits: torch.Tensor, top: int) -> TokenLogprob:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        best = torch.topk(logprobs, top) if top > 0 else None
        ranked = (
            []
            if best is None
            else [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(best.values, best.indices, strict=True)]
        )
        return TokenLogprob(token, self.tokenizer.decode([token]), float(logprobs[token]), ranked)

    def _reply_projection(self, shown: list[dict], text: str, reasoning: str = "") -> list[float | None]:
        """Mean projection of the reply's tokens per layer: the last row of `project.turn_activations`."""
        ids, start, end = self.template.reply_span(shown, text, reasoning)
        if end <= start:
            return [None] * len(self.layers)
        acts = mean_activations(self.model, [ids], [(start, end)], self.layers, progress=False)[0]
        values = torch.einsum("lh,lh->l", acts, self.units).tolist()
        return [v if math.isfinite(v) else None for v in values]


# ---------------------------------------------------------------------------------- building a session


def _model_shape(model_path: str) -> tuple[int, int, str] | None:
    """(n_layers, hidden_size, config hash) from the model's config, without loading weights; None when unknown."""
    if not Path(model_path, "config.json").is_file():
        return None  # a bundled GGUF or a hub id: checked once the model is loaded
    from transformers import AutoConfig

    from assistant_axis.provenance import config_sha

    config = AutoConfig.from_pretrained(model_path)
    return *config_dims(config), config_sha(config)


def _check_layers(layers: Sequence[int], axis_layers: list[int], n_layers: int | None, source: str) -> None:
    if n_layers is not None:
        check_layers(layers, n_layers, source, "layers")
    for layer in layers:
        if layer not in axis_layers:
            raise InputError(
                source,
                "layers",
                f"layer {layer} is not in the axis (it has layers {axis_layers[0]}..{axis_layers[-1]})",
            )


def load_session(
    model_path: str,
    axis_path: str,
    cap_path: str | None = None,
    steer_coefficient: float | None = None,
    steer_layers: Sequence[int] | None = None,
    steer_positions: str = "all",
    layers: Sequence[int] | None = None,
    dtype: str = "float32",
    sampling: Sampling | None = None,
    system: str | None = None,
    device: str | None = None,
    template_options: dict | None = None,
    cap_experiment: str | None = None,
    steer_unit: str = "unit",
) -> ChatSession:
    """Check every input against the axis and the model's config first (cheap), then load the model.

    Projection layers default to the capped layers when capping, else the axis's middle layer; steering
    layers default to the axis's middle layer. The chat template renders with `template_options`, by
    default those the axis's activations were rendered with. `cap_path` may be the paper code's
    `capping_config.pt`, with `cap_experiment` naming one of its experiments.
    """
    from assistant_axis.models import load_model

    shape = _model_shape(model_path)
    n_layers = shape[0] if shape else None
    axis, axis_layers, meta = load_axis(
        axis_path, n_layers=n_layers, hidden_size=shape[1] if shape else None, config_sha=shape[2] if shape else None
    )
    axis_model = meta.get("model") if isinstance(meta.get("model"), str) and meta.get("model") else None
    capping = None
    if cap_path:
        capping = load_capping(
            cap_path,
            model_name=axis_model,
            hidden_size=int(axis.shape[-1]),
            n_layers=n_layers,
            experiment=cap_experiment,
        )
    elif cap_experiment is not None:
        raise InputError("--experiment", "cap", "given without --cap capping_config.pt")
    middle = [axis_layers[len(axis_layers) // 2]]
    if steer_layers is not None and steer_coefficient is None:
        raise InputError("--steer-layers", "steer", "given without --steer COEFFICIENT")
    layers = sorted(set(layers)) if layers else (list(capping.layers) if capping else middle)
    _check_layers(layers, axis_layers, n_layers, "--layers")
    steering = None
    if steer_coefficient is not None:
        chosen = list(steer_layers) if steer_layers else middle
        _check_layers(chosen, axis_layers, n_layers, "--steer-layers")
        steering = Steering.along(
            axis[chosen], chosen, float(steer_coefficient), steer_positions, steer_unit, source="--steer-layers"
        )
    if template_options is None:
        recorded = meta.get("chat_template_kwargs")  # load_axis decodes it
        template_options = recorded if isinstance(recorded, dict) else {}
    model, tokenizer = load_model(model_path, dtype, device)
    return ChatSession(
        model,
        tokenizer,
        axis,
        axis_layers,
        layers,
        capping,
        steering,
        sampling or Sampling(temperature=0.7, top_p=0.9, max_tokens=256),
        system,
        str(axis_path),
        template_options,
    )


# ------------------------------------------------------------------------------------ the terminal loop


def format_projection(reply: Reply) -> str:
    """`[projection L21 +43.1  L25 +120.4]`; with capping each value shows its floor, `!` when below it."""
    parts = []
    for i, layer in enumerate(reply.layers):
        value = reply.projection[i]
        text = f"L{layer} " + ("n/a" if value is None else f"{value:+.1f}")
        tau = reply.tau[i] if reply.tau else None
        if tau is not None and value is not None:
            text += f" (tau {tau:+.1f}{' !' if value < tau - 1e-4 * abs(tau) else ''})"
        parts.append(text)
    return "[projection " + "  ".join(parts) + "]"


HELP = "commands: /system TEXT (new conversation with that system prompt), /reset, /quit"


def describe(session: ChatSession) -> str:
    parts = [f"projection layers {' '.join(map(str, session.layers))}"]
    if session.steering is not None:
        s = session.steering
        parts.append(f"steering {s.coefficient:+g} at layers {' '.join(map(str, s.layers))} ({s.positions})")
    if session.capping is not None:
        parts.append(f"capped at layers {' '.join(map(str, session.capping.layers))} ({session.capping.source})")
    return "; ".join(parts)


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Read user turns line by line (a terminal with line editing, or piped input) until /quit or EOF."""
    tty = stdin.isatty() and stdout.isatty()

    def say(text: str) -> None:
        print(text, file=stdout, flush=True)

    def read() -> str | None:
        if tty:
            try:
                return input("you> ")
            except EOFError:
                return None
        line = stdin.readline()
        return line.rstrip("\n") if line else None

    say(describe(session))
    say(HELP)
    while (line := read()) is not None:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            say("(conversation cleared)")
            continue
        if line == "/system" or line.startswith("/system "):
            session.set_system(line.removeprefix("/system").strip())
            say(f"(new conversation; system prompt {'set' if session.system else 'cleared'})")
            continue
        if line.startswith("/"):
            say(HELP)
            continue
        if not tty:
            say(f"you> {line}")
        try:
            reply = session.send(line)
        except KeyboardInterrupt:
            say("(interrupted)")
            continue
        say(f"assistant> {reply.text}")
        say(format_projection(reply))


def with_sampling(session: ChatSession, **changes) -> Sampling:
    """The session's sampling with some fields replaced (None leaves a field as it is)."""
    return replace(session.sampling, **{k: v for k, v in changes.items() if v is not None})
