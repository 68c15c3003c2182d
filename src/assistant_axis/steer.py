"""Steering: add `coefficient * unit axis` to the residual stream at chosen layers.

A positive coefficient pushes towards the Assistant, a negative one away from it (towards the
roles). The coefficient is in the residual stream's own units: compare it with the projections the
activations stage records at those layers. `unit="raw"` adds `coefficient * axis` instead, the raw
vector, as the paper's code does: its coefficients are ours divided by the axis norm at that layer.

>>> with steer(model, axis_rows, layers=[12, 15], coefficient=-8.0):
...     model.generate(...)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from assistant_axis.axis import unit_vectors
from assistant_axis.errors import InputError
from assistant_axis.models import block_hidden, check_layers, find_blocks, hidden_size, with_block_hidden

__all__ = ["steer", "POSITIONS", "UNITS"]

POSITIONS = ("all", "last")
# What one unit of the coefficient adds: the unit axis (ours), or the axis vector itself (the paper code's).
UNITS = ("unit", "raw")


@contextmanager
def steer(
    model,
    directions: torch.Tensor,
    layers: Sequence[int],
    coefficient: float,
    positions: str = "all",
    blocks_path: str | None = None,
    source: str = "steering",
    unit: str = "unit",
) -> Iterator[None]:
    """Add `coefficient * directions[i] / |directions[i]|` (`unit="raw"`: `coefficient * directions[i]`) to
    block `layers[i]`'s output.

    `directions` is [hidden] (the same at every layer) or [len(layers), hidden]. `positions="last"`
    steers only the last token of each forward pass: the prompt's last token, then every generated
    token (with left padding, as our generation backend uses). Hooks are removed on exit.
    """
    if positions not in POSITIONS:
        raise InputError(source, "positions", f"{positions!r} is not one of {', '.join(POSITIONS)}")
    if unit not in UNITS:
        raise InputError(source, "unit", f"{unit!r} is not one of {', '.join(UNITS)}")
    blocks = find_blocks(model, blocks_path)
    layers = list(layers)
    rows = directions.float()
    rows = rows.expand(len(layers), -1) if rows.dim() == 1 else rows
    if rows.shape[-1] != hidden_size(model):
        raise InputError(
            source, "hidden_size", f"vector has size {rows.shape[-1]}, the model's hidden size is {hidden_size(model)}"
        )
    if len(rows) != len(layers):
        raise InputError(source, "layers", f"{len(layers)} layers but {len(rows)} vectors")
    check_layers(layers, len(blocks), source, "layers")
    shifts = coefficient * (unit_vectors(rows) if unit == "unit" else rows)

    def hook_for(shift: torch.Tensor):
        def hook(_module, _args, output):
            h = block_hidden(output)
            delta = shift.to(device=h.device, dtype=h.dtype)
            if positions == "all":
                return with_block_hidden(output, h + delta)
            steered = h.clone()
            steered[:, -1] += delta
            return with_block_hidden(output, steered)

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(shifts[i])) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
