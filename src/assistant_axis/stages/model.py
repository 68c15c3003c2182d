"""prepare_model: the configured model, ready to load (a bundled GGUF converted once)."""

from __future__ import annotations

from dataclasses import asdict

from assistant_axis.artifacts import write_json
from assistant_axis.models import prepare_model as prepare
from assistant_axis.stages.common import MODEL_KEYS, config_keys, log


@config_keys(MODEL_KEYS)
def prepare_model(output: str, name: str, source: str, models_dir: str, trust_remote_code: bool = False) -> None:

    info = prepare(name, source, models_dir, trust_remote_code)
    log.info("model %s ready at %s (%d layers, hidden %d)", name, info.path, info.n_layers, info.hidden_size)
    write_json(asdict(info), output)
