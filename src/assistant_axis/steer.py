"""Steering: add `coefficient * unit axis` to the residual stream at chosen layers.

A positive coefficient pushes towards the Assistant, a negative one away from it (towards the
roles). The coefficient is in the residual stream's own units: compare it with the projections the
activations stage records at those layers. `unit="raw"` adds `coefficient * axis` instead, the raw
vector, as the paper's code does: its coefficients are ours divided by the axis norm at that layer.

`Steering` is the intervention (see `interventions`); `steer` installs one in a transformers model:

>>> with steer(model, axis_rows, layers=[12, 15], coefficient=-8.0):
...     model.generate(...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from assistant_axis.axis import unit_vectors
from assistant_axis.errors import InputError
from assistant_axis.interventions import install

__all__ = ["Steering", "steer", "POSITIONS", "UNITS"]

POSITIONS = ("all", "last")
# What one unit of the coefficient adds: the unit axis (ours), or the axis vector itself (the paper code's).
UNITS = ("unit", "raw")


@dataclass(frozen=True)
class Steering:
    """Add `shifts[k]` to block `layers[k]`'s output: at every token, or (`positions="last"`) at the last
    token of each forward pass, i.e. the prompt's last token, then every generated one (our generation
    pads on the left, so the last position is every row's newest token)."""

    layers: list[int]
    shifts: torch.Tensor  # [len(layers), hidden]
    coefficient: float  # as asked for (the shifts already hold it)
    positions: str = "all"
    source: str = "steering"  # where it came from, named in error messages

    @classmethod
    def along(
        cls,
        directions: torch.Tensor,
        layers: Sequence[int],
        coefficient: float,
        positions: str = "all",
        unit: str = "unit",
        source: str = "steering",
    ) -> Steering:
        """`coefficient * directions[i] / |directions[i]|` at `layers[i]` (`unit="raw"`: `coefficient *
        directions[i]`). `directions` is [hidden] (the same at every layer) or [len(layers), hidden]."""
        if positions not in POSITIONS:
            raise InputError(source, "positions", f"{positions!r} is not one of {', '.join(POSITIONS)}")
        if unit not in UNITS:
            raise InputError(source, "unit", f"{unit!r} is not one of {', '.join(UNITS)}")
        layers = list(layers)
        rows = directions.float()
        rows = rows.expand(len(layers), -1) if rows.dim() == 1 else rows
        if len(rows) != len(layers):
            raise InputError(source, "layers", f"{len(layers)} layers but {len(rows)} vectors")
        shifts = coefficient * (unit_vectors(rows) if unit == "unit" else rows)
        return cls(layers, shifts, float(coefficient), positions, source)

    @property
    def hidden_size(self) -> int:
        return int(self.shifts.shape[-1])

    def to(self, device: torch.device | str) -> Steering:
        return dataclasses.replace(self, shifts=self.shifts.to(device))

    def edit(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        delta = self.shifts[k].to(hidden.dtype)  # on hidden's device already (`to`): never copied here
        if self.positions == "all":
            return hidden + delta
        steered = hidden.clone()
        steered[..., -1, :] += delta
        return steered


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
    """Steer a transformers model while active (`Steering.along` says what is added); hooks removed on exit."""
    with install(
        model, Steering.along(directions, layers, coefficient, positions, unit, source), blocks_path=blocks_path
    ):
        yield
