"""Talking to a model while watching its projection on the Assistant Axis, optionally capped or steered.

`load_session` checks the axis, capping configs and steering against the model, then opens an engine's
session (`engines`: transformers by default, or vLLM): each reply comes with its mean projection per
layer under the same hooks that generated it, so a capped reply's projection is the post-cap one.
`run_chat` is the terminal loop behind `assistant-axis chat`; `serve` answers OpenAI-style requests
through the same session.

>>> session = load_session("results/models/smollm2-135m-instruct", "results/smollm2-135m-instruct/axis.safetensors",
...                        ["results/smollm2-135m-instruct/capping/late-p25.safetensors"])
>>> reply = session.send("Who are you?")
>>> reply.text, reply.projection   # values per layer in session.layers
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from assistant_axis.axis import load_axis, unit_rows
from assistant_axis.engines import Reply, Sampling, engine_spec, open_engine
from assistant_axis.errors import InputError
from assistant_axis.interop import load_capping
from assistant_axis.models import check_layers, config_dims
from assistant_axis.provenance import config_sha
from assistant_axis.steer import Steering

__all__ = ["load_session", "format_projection", "run_chat", "default_model", "with_sampling"]

BUNDLED_DEFAULT = "bundled:smollm2-135m-instruct"
PREPARED_DEFAULT = "results/models/smollm2-135m-instruct"


def default_model() -> str:
    """The workflow's prepared copy of the bundled model when it exists (loads in ~1 s), else the GGUF."""
    return PREPARED_DEFAULT if (Path(PREPARED_DEFAULT) / "config.json").is_file() else BUNDLED_DEFAULT


# ---------------------------------------------------------------------------------- building a session


def _model_shape(model_path: str) -> tuple[int, int, str] | None:
    """(n_layers, hidden_size, config hash) from the model's config, without loading weights; None when unknown."""
    if not Path(model_path, "config.json").is_file():
        return None  # a bundled GGUF or a hub id: checked once the model is loaded
    # transformers loads only with a model (light paths import this module)
    from transformers import AutoConfig

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
    cap_paths: Sequence[str] = (),
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
    engine: str = "transformers",
    engine_args: dict | None = None,
):
    """Check every input against the axis and the model's config first (cheap), then open the engine.

    Each capping config is a setting named by its file's stem (`late-p25`), besides `"none"`; the first is
    the default. Projection layers default to the capped layers, else the axis's middle layer; steering
    layers default to the axis's middle layer. The chat template renders with `template_options`, by
    default those the axis's activations were rendered with. A cap path may be the paper code's
    `capping_config.pt`, with `cap_experiment` naming one of its experiments. `engine_args` are the
    engine's own settings (vLLM's, as a config's `vllm` block holds them).
    """
    spec = engine_spec(engine, "--engine", ["sessions"])
    shape = _model_shape(model_path)
    n_layers = shape[0] if shape else None
    axis, axis_layers, meta = load_axis(
        axis_path, n_layers=n_layers, hidden_size=shape[1] if shape else None, config_sha=shape[2] if shape else None
    )
    axis_model = meta.get("model") if isinstance(meta.get("model"), str) and meta.get("model") else None
    if cap_experiment is not None and not cap_paths:
        raise InputError("--experiment", "cap", "given without --cap capping_config.pt")
    cappings = {}
    for path in cap_paths:
        config = load_capping(
            path, model_name=axis_model, hidden_size=int(axis.shape[-1]), n_layers=n_layers, experiment=cap_experiment
        )
        cappings[Path(path).stem] = config
    if "none" in cappings:
        raise InputError(cap_paths[list(cappings).index("none")], "name", "'none' names the uncapped setting")
    middle = [axis_layers[len(axis_layers) // 2]]
    if steer_layers is not None and steer_coefficient is None:
        raise InputError("--steer-layers", "steer", "given without --steer COEFFICIENT")
    capped = sorted(set(itertools.chain.from_iterable(c.layers for c in cappings.values())))
    layers = sorted(set(layers)) if layers else (capped or middle)
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
    section = {spec.block: engine_args} if spec.block and engine_args else {}
    opened = open_engine(
        engine,
        model_path,
        section,
        "--engine-args",
        dtype=dtype,
        template_options=template_options,
        model_name=model_path,
        device=device,
        progress=False,
    )
    units = unit_rows(axis, axis_layers, layers, int(axis.shape[-1]), str(axis_path))
    return opened.session(units, layers, cappings, steering, sampling, system)


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


def describe(session) -> str:
    parts = [f"projection layers {' '.join(map(str, session.layers))}"]
    if session.steering is not None:
        s = session.steering
        parts.append(f"steering {s.coefficient:+g} at layers {' '.join(map(str, s.layers))} ({s.positions})")
    if session.capping is not None:
        parts.append(f"capped at layers {' '.join(map(str, session.capping.layers))} ({session.capping.source})")
    return "; ".join(parts)


def run_chat(session, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
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


def with_sampling(session, **changes) -> Sampling:
    """The session's sampling with some fields replaced (None leaves a field as it is)."""
    return replace(session.sampling, **{k: v for k, v in changes.items() if v is not None})
