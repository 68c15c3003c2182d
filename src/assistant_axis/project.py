"""Per-turn projections of a conversation on the Assistant Axis: watching a conversation drift.

A message's activation is the mean block output over its tokens, computed on the conversation up to
and including that message: for a reply, exactly what the activations stage stores. Its projection
is that activation on the unit axis of the same layer (larger = more Assistant-like).

>>> frame = conversation_projections(model, ChatTemplate(tokenizer), messages, axis, axis_layers, layers=[15, 20])
>>> plot_trajectory(frame, "drift.png")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from assistant_axis.activations import mean_activations, token_projections
from assistant_axis.artifacts import save_figure
from assistant_axis.axis import unit_rows
from assistant_axis.errors import InputError
from assistant_axis.models import hidden_size
from assistant_axis.templates import ChatTemplate

__all__ = [
    "load_conversation",
    "turn_activations",
    "conversation_projections",
    "turn_projections",
    "projection_frame",
    "plot_trajectory",
]

ROLES = ("system", "user", "assistant")


def load_conversation(path: str | Path) -> list[dict]:
    """A JSON list of `{"role", "content"}` messages, checked field by field."""
    try:
        messages = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, "file", f"not a readable JSON file ({exc})") from exc
    if not isinstance(messages, list) or not messages:
        raise InputError(path, "messages", "expected a non-empty JSON list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InputError(path, f"[{i}].role", f"must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise InputError(path, f"[{i}].content", "must be a string")
    return messages


def _template(template) -> ChatTemplate:
    # A bare tokenizer renders with its template's defaults (no options).
    return template if isinstance(template, ChatTemplate) else ChatTemplate(template)


def turn_activations(
    model,
    template,
    messages: list[dict],
    layers: Sequence[int],
    blocks_path: str | None = None,
) -> tuple[list[dict], torch.Tensor]:
    """The messages as the template sees them, and their activations [n_messages, len(layers), hidden].

    `template` is a `ChatTemplate` (or a tokenizer, rendered without options). Each message is taken in
    the conversation up to it, so an assistant turn is measured as it was generated.
    """
    template = _template(template)
    messages = template.fit(messages)
    sequences, spans = [], []
    for i, message in enumerate(messages):
        ids, start, end = template.turn_span(messages[:i], message)
        sequences.append(ids)
        spans.append((start, end))
    return messages, mean_activations(model, sequences, spans, list(layers), blocks_path=blocks_path, progress=False)


def conversation_projections(
    model,
    template,
    messages: list[dict],
    axis: torch.Tensor,
    axis_layers: list[int],
    layers: Sequence[int],
    blocks_path: str | None = None,
    source: str = "axis",
) -> pd.DataFrame:
    """One row per (message, layer): `turn, role, layer, projection, n_chars` (see `turn_projections`)."""
    layers = sorted(layers)
    units = unit_rows(axis, axis_layers, layers, hidden_size(model), source)
    shown, values = turn_projections(model, template, messages, units, layers, blocks_path)
    return projection_frame(shown, layers, values)


def turn_projections(
    model, template, messages: list[dict], units: torch.Tensor, layers: Sequence[int], blocks_path: str | None = None
) -> tuple[list[dict], torch.Tensor]:
    """The messages as the template sees them, and each one's mean projection [n_messages, len(layers)] on
    `units` (unit axis rows, one per layer), NaN for an empty message.

    Each message is measured in the conversation up to it (as `turn_activations`), but in one pass: under
    causal attention a token sees only what precedes it, so the whole conversation's pass gives every
    message whose rendering it extends; a message the template renders otherwise once later turns exist
    (one that drops earlier think blocks, say) gets a pass over its own prefix. The projection of a mean
    is the mean of the tokens' projections."""
    template = _template(template)
    messages = template.fit(messages)
    located = [template.turn_span(messages[:i], message) for i, message in enumerate(messages)]
    whole = located[-1][0]
    sequences, spans, reads = [whole], [(0, len(whole))], []
    for ids, start, end in located:
        if ids[:end] == whole[:end]:
            reads.append((0, start, end))
        else:
            reads.append((len(sequences), start, end))
            sequences.append(ids)
            spans.append((start, end))
    tokens = token_projections(model, sequences, spans, list(layers), units, blocks_path=blocks_path, progress=False)
    offsets = [0]
    for first, last in spans:
        offsets.append(offsets[-1] + last - first)
    projections = torch.full((len(messages), len(layers)), float("nan"))
    for i, (k, start, end) in enumerate(reads):
        if end > start:
            at = offsets[k] + start - spans[k][0]
            projections[i] = tokens[at : at + end - start].double().mean(dim=0).float()
    return messages, projections


def projection_frame(messages: list[dict], layers: Sequence[int], projections: torch.Tensor) -> pd.DataFrame:
    """Per-message projections [n_messages, len(layers)] as rows of `turn, role, layer, projection, n_chars`."""
    rows = [
        {
            "turn": i,
            "role": m["role"],
            "layer": layer,
            "projection": float(projections[i, j]),
            "n_chars": len(m["content"]),
        }
        for i, m in enumerate(messages)
        for j, layer in enumerate(layers)
    ]
    return pd.DataFrame(rows)


def plot_trajectory(frame: pd.DataFrame, path: str | Path, title: str = "Projection on the Assistant Axis") -> None:
    """Projection per turn, one line per layer; assistant turns as filled markers, others hollow."""
    # matplotlib only for a plot
    import matplotlib

    matplotlib.use("Agg")
    # matplotlib only for a plot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for layer, part in frame.groupby("layer"):
        line = ax.plot(part["turn"], part["projection"], label=f"layer {layer}", alpha=0.8)[0]
        replies = part[part["role"] == "assistant"]
        ax.scatter(replies["turn"], replies["projection"], color=line.get_color(), zorder=3)
        others = part[part["role"] != "assistant"]
        ax.scatter(others["turn"], others["projection"], facecolors="none", edgecolors=line.get_color(), zorder=3)
    ax.set_xlabel("turn (filled: assistant, hollow: user/system)")
    ax.set_ylabel("projection (larger = more Assistant-like)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)
