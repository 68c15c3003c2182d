"""Which blocks: layer lists checked against a model's depth, and a model's dimensions from its config.

Plain Python, no torch: the workflow's planner checks a config's layers with these before any job runs
(every Snakemake invocation plans, on the workstation and in every cluster job).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from assistant_axis.errors import ArgumentError, InputError

__all__ = ["config_dims", "check_layers", "resolve_layers"]


def config_dims(config) -> tuple[int, int]:
    """(n_layers, hidden_size) of a transformers config, or of a config.json read as a dict; a multimodal
    model's are those of its text model."""
    if isinstance(config, dict):
        text = config.get("text_config", config)
        return int(text["num_hidden_layers"]), int(text["hidden_size"])
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers), int(text.hidden_size)


def check_layers(layers: Sequence[int], n_layers: int, source: str | Path, key: str) -> None:
    """One error for a layer outside the model, naming `source` and `key`."""
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise InputError(source, key, f"layer {layer} is outside the model's {n_layers} layers (0..{n_layers - 1})")


def resolve_layers(layers: str | Sequence[int], n_layers: int) -> list[int]:
    """`"all"` or a list of block indices (negative counts from the end), checked against the model."""
    if layers == "all":
        return list(range(n_layers))
    if isinstance(layers, str):
        raise ArgumentError("resolve_layers", "layers", f"expected 'all' or a list of integers, got {layers!r}")
    resolved = [layer + n_layers if layer < 0 else layer for layer in layers]
    for layer, index in zip(layers, resolved, strict=True):
        if not 0 <= index < n_layers:
            raise ArgumentError("resolve_layers", "layers", f"layer {layer} is outside the model's {n_layers} layers")
    if len(set(resolved)) != len(resolved):
        raise ArgumentError("resolve_layers", "layers", f"repeated layer in {list(layers)}")
    return sorted(resolved)
