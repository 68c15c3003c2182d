"""Role vectors and the Assistant Axis.

A role vector is the mean activation of the role's qualifying replies (judge score >= `min_score`);
the `default` role uses all of its replies. The axis is, per layer,
`mean(default vectors) - mean(role vectors)`: it points from the roles towards the Assistant.

>>> axis, layers, meta = load_axis("results/smollm2-135m-instruct/axis.safetensors")
>>> projection = project(activation, axis[20])   # block 20's; larger = more Assistant-like
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from assistant_axis.artifacts import read_tensors
from assistant_axis.errors import InputError
from assistant_axis.provenance import check_provenance, decoded_value, warn_unchecked

__all__ = ["RoleVector", "role_vector", "compute_axis", "load_axis", "by_block", "project", "unit_rows", "unit_vectors"]


@dataclass(frozen=True)
class RoleVector:
    role: str
    vector: torch.Tensor  # [n_layers, hidden]
    n_responses: int
    n_used: int
    included: bool


def role_vector(
    role: str,
    activations: torch.Tensor,
    scores: pd.Series | None,
    min_score: int = 3,
    min_count: int = 1,
) -> RoleVector:
    """Mean of the qualifying rows of `activations` [n, layers, hidden]; `scores=None` uses every row.

    Rows with a null score or non-finite activations (empty replies) never qualify. A role with fewer
    than `min_count` qualifying rows is returned with `included=False` and a zero vector.
    """
    finite = torch.isfinite(activations).flatten(1).all(dim=1)
    if scores is None:
        keep = finite
    else:
        if len(scores) != len(activations):
            raise InputError(role, "score", f"{len(scores)} scores for {len(activations)} activation rows")
        qualifies = torch.as_tensor((scores.astype("Float64") >= min_score).fillna(False).to_numpy(dtype=bool))
        keep = finite & qualifies
    n_used = int(keep.sum())
    included = n_used >= min_count and n_used > 0
    vector = activations[keep].mean(dim=0) if included else torch.zeros(activations.shape[1:])
    return RoleVector(role, vector, len(activations), n_used, included)


def compute_axis(default: torch.Tensor, roles: list[torch.Tensor]) -> torch.Tensor:
    """`mean(default) - mean(roles)` per layer. `default`: [layers, hidden] or a stack of such vectors."""
    if not roles:
        raise InputError("vectors", "included", "no role has enough qualifying responses to build an axis")
    default_mean = default if default.dim() == 2 else default.mean(dim=0)
    return default_mean - torch.stack(roles).mean(dim=0)


def load_axis(
    path: str | Path,
    model: str | None = None,
    n_layers: int | None = None,
    hidden_size: int | None = None,
    config_sha: str | None = None,
) -> tuple[torch.Tensor, list[int], dict]:
    """The axis [n_layers, hidden] indexed by block (`axis[i]` is block i's; NaN where not extracted), the
    blocks it has, and the metadata. The provenance is checked against what is given (None: unchecked)."""

    tensors, meta = read_tensors(path)
    checked = check_provenance(
        meta, path, "axis", model=model, n_layers=n_layers, hidden_size=hidden_size, model_config_sha=config_sha
    )
    for name in ("axis", "layers"):
        if name not in tensors:
            raise InputError(path, name, "tensor missing")
    decoded = {key: decoded_value(value) for key, value in meta.items()}
    axis, layers = tensors["axis"], tensors["layers"].tolist()
    if axis.dim() != 2 or not layers or min(layers) < 0:
        raise InputError(path, "axis", f"shape {tuple(axis.shape)} with layers {layers}")
    if len(axis) == len(layers) and layers != list(range(len(layers))):  # a compact file (rows = its layers)
        axis = by_block(axis, layers, int(decoded.get("n_layers", max(layers) + 1)))
    if len(axis) <= max(layers):
        raise InputError(path, "layers", f"layer {max(layers)} but the axis has {len(axis)} rows")
    if hidden_size is not None and axis.shape[-1] != hidden_size:
        raise InputError(
            path, "hidden_size", f"axis has hidden size {axis.shape[-1]}, the model in use has {hidden_size}"
        )
    if n_layers is not None and len(axis) > n_layers:
        raise InputError(path, "n_layers", f"axis has {len(axis)} layers, the model in use has {n_layers}")
    if not checked:
        warn_unchecked(path)
    return axis, layers, decoded


def by_block(rows: torch.Tensor, layers: list[int], n_layers: int) -> torch.Tensor:
    """Rows [len(layers), hidden] placed at their block indices of a [n_layers, hidden] tensor, NaN elsewhere."""
    full = torch.full((n_layers, rows.shape[-1]), float("nan"), dtype=rows.dtype)
    full[layers] = rows
    return full


def unit_vectors(rows: torch.Tensor) -> torch.Tensor:
    """Each row (or a single vector) scaled to unit length, in float32: the form every projection, cap and
    unit-coefficient steer uses."""
    rows = rows.float()
    return rows / rows.norm(dim=-1, keepdim=True)


def project(activation: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Scalar projection of activation(s) [..., hidden] on the unit axis [hidden]."""
    return activation.float() @ unit_vectors(axis)


def unit_rows(
    axis: torch.Tensor, axis_layers: list[int], layers: list[int], hidden: int, source: str = "axis"
) -> torch.Tensor:
    """Unit axis vectors [len(layers), hidden] for model layers `layers` of a block-indexed axis, checked
    against the model's `hidden` and against the blocks the axis has (`axis_layers`)."""
    if axis.shape[-1] != hidden:
        raise InputError(source, "hidden_size", f"axis has hidden size {axis.shape[-1]}, the model has {hidden}")
    missing = [layer for layer in layers if layer not in axis_layers]
    if missing:
        raise InputError(
            source,
            "layers",
            f"layer {missing[0]} is not in the axis (it has layers {axis_layers[0]}..{axis_layers[-1]})",
        )
    return unit_vectors(axis[list(layers)])
