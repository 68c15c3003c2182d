"""Activation capping: hold the residual stream's projection on the Assistant Axis at or above a floor.

At each capped layer, with `v` the unit axis and `tau` that layer's threshold, the block output `h`
becomes `h - v * min(<h, v> - tau, 0)`: untouched while `<h, v> >= tau`, otherwise lifted onto the
floor along `v` only. `tau` is a percentile of the default Assistant's projections (the workflow's
`calibrate` stage writes one capping config per layer range and percentile). An optional ceiling
makes it a two-sided band.

>>> config = interop.load_capping("results/smollm2-135m-instruct/capping/late-p25.safetensors",
...                               model_name="smollm2-135m-instruct")
>>> with cap(model, config):
...     model.generate(...)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from assistant_axis.artifacts import read_tensors, write_tensors
from assistant_axis.axis import unit_vectors
from assistant_axis.errors import ArgumentError, InputError
from assistant_axis.interventions import install

__all__ = [
    "CALIBRATION_PERCENTILES",
    "CappingConfig",
    "read_capping",
    "layer_range",
    "percentile_thresholds",
    "cap",
    "cap_shift",
]

# The percentiles of the default replies' projections that calibration always records.
CALIBRATION_PERCENTILES = (1, 5, 10, 25, 50, 75)


@dataclass(frozen=True)
class CappingConfig:
    layers: list[int]  # model block indices
    vectors: torch.Tensor  # [k, hidden] unit axis per capped layer
    thresholds: torch.Tensor  # [k] floor per capped layer
    model: str  # the model whose axis this is
    upper: torch.Tensor | None = None  # [k] ceiling per layer (two-sided band), or None
    source: str = "capping"  # where it came from, for error messages
    metadata: dict = field(default_factory=dict)  # the file's metadata (provenance, experiment id, ...)

    def save(self, path: str | Path, **metadata) -> None:
        """Vectors as float32; thresholds keep float64 where they are (an imported config's exact values)."""

        def exact(t: torch.Tensor) -> torch.Tensor:
            return t if t.dtype == torch.float64 else t.float()

        tensors = {
            "layers": torch.tensor(self.layers, dtype=torch.int64),
            "vectors": self.vectors.float().contiguous(),
            "thresholds": exact(self.thresholds),
        }
        if self.upper is not None:
            tensors["upper"] = exact(self.upper)
        write_tensors(tensors, path, {"model": self.model, "hidden_size": int(self.vectors.shape[-1]), **metadata})

    def with_upper(self, upper: torch.Tensor) -> CappingConfig:
        return CappingConfig(self.layers, self.vectors, self.thresholds, self.model, upper, self.source, self.metadata)

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[-1])

    def floors(self, layers: list[int]) -> list[float | None]:
        """The threshold at each of `layers`; None where a layer is not capped."""
        by_layer = dict(zip(self.layers, self.thresholds.tolist(), strict=True))
        return [by_layer.get(layer) for layer in layers]

    def to(self, device: torch.device | str) -> CappingConfig:
        """The config with its vectors on `device` (thresholds stay host numbers)."""
        return dataclasses.replace(self, vectors=self.vectors.to(device))

    def edit(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """`h - v * min(<h, v> - tau, 0)` (and `- v * max(<h, v> - ceiling, 0)` for a band) at the k-th
        capped layer, computed in float32; an intervention (see `interventions`). The vectors must be on
        `hidden`'s device (`to`): an edit never copies them."""
        unit = self.vectors[k]
        h = hidden.float()
        proj = h @ unit  # [..., tokens]
        ceiling = math.inf if self.upper is None else float(self.upper[k])
        shift = cap_shift(proj, float(self.thresholds[k]), ceiling)
        return (h - shift.unsqueeze(-1) * unit).to(hidden.dtype)

    def normalized(self) -> CappingConfig:
        """The same config with unit vectors (how `cap` uses them)."""
        units = unit_vectors(self.vectors)
        return CappingConfig(self.layers, units, self.thresholds, self.model, self.upper, self.source, self.metadata)


def cap_shift(projection: torch.Tensor, floor, ceiling) -> torch.Tensor:
    """How far a projection is lifted or lowered onto the band [floor, ceiling]: negative below the floor,
    positive above the ceiling, 0 within (exactly, so an uncapped row keeps its bits). The one
    implementation of the cap's arithmetic: `CappingConfig.edit` and the vLLM engine's ops (`-inf` / `inf`
    bounds: none) use it."""
    return (projection - floor).clamp(max=0) + (projection - ceiling).clamp(min=0)


def read_capping(path: str | Path) -> CappingConfig:
    """A capping config's values exactly as stored (vectors not normalised), with its metadata."""
    tensors, meta = read_tensors(path, ["layers", "vectors", "thresholds"])
    layers, vectors, thresholds = tensors["layers"].tolist(), tensors["vectors"], tensors["thresholds"]
    if vectors.dim() != 2 or len(vectors) != len(layers) or thresholds.shape != (len(layers),):
        raise InputError(
            path,
            "vectors",
            f"{len(layers)} layers but vectors {tuple(vectors.shape)} and thresholds {tuple(thresholds.shape)}",
        )
    return CappingConfig(layers, vectors, thresholds, meta.get("model", ""), tensors.get("upper"), str(path), meta)


def layer_range(fractions: Sequence[float], n_layers: int) -> list[int]:
    """Blocks from `start` to `end` (fractions of depth, end exclusive), e.g. [0.7, 0.85] of 30 -> 21..25."""
    start, end = fractions
    first, stop = round(start * n_layers), round(end * n_layers)
    if not 0 <= first < stop <= n_layers:
        raise ArgumentError("layer_range", "fractions", f"{list(fractions)} selects no layers of {n_layers}")
    return list(range(first, stop))


def percentile_thresholds(projections: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """[len(percentiles), n_layers] percentiles (linear interpolation) of projections [n, n_layers]."""
    finite = projections[torch.isfinite(projections).all(dim=1)].double()
    if not len(finite):
        raise InputError("activations", "default", "no finite default activations to calibrate on")
    q = torch.tensor([p / 100 for p in percentiles], dtype=torch.float64)
    return torch.quantile(finite, q, dim=0).float()


@contextmanager
def cap(model, config: CappingConfig, blocks_path: str | None = None) -> Iterator[CappingConfig]:
    """Cap a transformers model's listed blocks while active (`CappingConfig.edit` says how); hooks are removed
    on exit, also on error."""
    with install(model, config, blocks_path=blocks_path):
        yield config
