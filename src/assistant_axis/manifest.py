"""Where a model manifest (`results/<model>/model.json`, written by the prepare_model stage) says its model
is, read from any working directory. A light module (no torch): planning reads manifests too.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["workflow_dir", "model_path"]


def workflow_dir(manifest: str | Path) -> Path:
    """The workflow directory of a model manifest: the folder holding `results/` (`results/<model>/model.json`),
    absolute, whatever the working directory. Symbolic links on the way are kept, not resolved."""
    parents = Path(os.path.abspath(manifest)).parents
    return parents[min(2, len(parents) - 1)]


def model_path(manifest: str | Path, recorded: str) -> str:
    """The model that the manifest `manifest` records as `recorded` (its `path`), loadable from any working
    directory: a `./` path is relative to the manifest's workflow directory, not to the process's; an
    absolute path (a model outside the workflow, or a manifest written before paths were relative) and a
    hub id are used as they are."""
    if recorded.startswith("./"):
        return str(workflow_dir(manifest) / recorded[2:])
    return recorded
