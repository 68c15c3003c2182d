"""prepare_model: the configured model, ready to load (a bundled GGUF converted once)."""

from __future__ import annotations

from dataclasses import asdict

from assistant_axis.artifacts import write_json
from assistant_axis.manifest import model_path, workflow_dir
from assistant_axis.models import prepare_model as prepare
from assistant_axis.stages.common import MODEL_KEYS, config_keys, log


@config_keys(MODEL_KEYS)
def prepare_model(output: str, name: str, source: str, models_dir: str, trust_remote_code: bool = False) -> None:
    """Write the manifest `output` (`results/<model>/model.json`); a model directory inside the workflow
    directory is recorded relative to it, so that the results can be copied or moved (see `ModelInfo`)."""
    info = prepare(name, source, models_dir, trust_remote_code, workflow=workflow_dir(output))
    where = model_path(output, info.path)
    log.info("model %s ready at %s (%d layers, hidden %d)", name, where, info.n_layers, info.hidden_size)
    write_json(asdict(info), output)
