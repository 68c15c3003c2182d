"""The tiny run's model, axis and a capping config built from it, for the serve/chat/project tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from assistant_axis.axis import load_axis, unit_rows
from assistant_axis.cap import CappingConfig, percentile_thresholds

MODEL = "smollm2-135m-instruct"
CAPPED = [21, 22, 23, 24, 25]


def tiny_paths(tiny_run: Path) -> tuple[Path, Path]:
    """(model directory, axis file) of the tiny run."""
    return tiny_run / f"results/models/{MODEL}", tiny_run / f"results/{MODEL}/axis.safetensors"


def capping_config(tiny_run: Path, model: str = MODEL) -> CappingConfig:
    """p25 of the default replies' projections over layers 21-25, as the calibrate stage computes it."""
    axis, layers, _ = load_axis(tiny_paths(tiny_run)[1])
    default = load_file(tiny_run / f"results/{MODEL}/activations/default.safetensors")["activations"]
    units = unit_rows(axis, layers, CAPPED, 576)
    projections = torch.einsum("nlh,lh->nl", default[:, CAPPED].float(), units)
    return CappingConfig(CAPPED, units, percentile_thresholds(projections, [25])[0], model)
