"""activations: each reply's mean activation over its tokens at every requested layer."""

from __future__ import annotations

from assistant_axis.artifacts import read_parquet
from assistant_axis.engines import engine_spec, open_engine
from assistant_axis.errors import InputError
from assistant_axis.layers import resolve_layers
from assistant_axis.models import DTYPES
from assistant_axis.stages.common import (
    LAYER_KEYS,
    MODEL_KEYS,
    RESPONSE_COLUMNS,
    config_keys,
    model_info,
    rendered_replies,
    write_activations,
)


@config_keys({**MODEL_KEYS, **LAYER_KEYS, "vllm_mean_activations.layers": "activations.layers"})
def activations(
    model: str,
    responses: list[str],
    outputs: list[str],
    layers,
    dtype: str = "float32",
    compute_dtype: str = "float32",
    batch_tokens: int = 8192,
    blocks: str | None = None,
    trust_remote_code: bool = False,
    template_options: dict | None = None,
    backend: str = "transformers",
    settings: dict | None = None,
) -> None:
    """Per-response mean activation over the response's tokens at every requested layer; one model load
    for all the given roles (`responses[i]` -> `outputs[i]`), in the engine `backend` (`settings`: its
    block of the activations section, `activations.vllm`).

    Conversations render with `template_options` as generation rendered them; a thinking model's
    reasoning is rendered where the template puts it, before the reply, and is not part of the mean.
    Every reply is located before the model runs: one that cannot be is an error and nothing is written.
    """

    if dtype not in DTYPES:
        raise InputError("config", "activations.dtype", f"unknown dtype {dtype!r}")
    frames = [read_parquet(path, RESPONSE_COLUMNS) for path in responses]
    info = model_info(model)
    spec = engine_spec(backend, "activations.backend", ["activations"])
    section = {"batch_tokens": batch_tokens, "blocks": blocks, **({spec.block: settings or {}} if spec.block else {})}
    engine = open_engine(
        backend,
        info["path"],
        section,
        "activations",
        dtype=compute_dtype,
        trust_remote_code=trust_remote_code,
        template_options=template_options,
        model_name=info["name"],
    )
    try:
        layer_ids = resolve_layers(layers, info["n_layers"])
        sequences, spans = rendered_replies(engine.template, responses, frames)
        limit = engine.context_length
        where = [(path, row) for path, frame in zip(responses, frames, strict=True) for row in range(len(frame))]
        for (path, row), ids in zip(where, sequences, strict=True):
            if limit is not None and len(ids) > limit:
                raise InputError(
                    path,
                    "response",
                    f"row {row}: its conversation has {len(ids)} tokens, more than the engine takes ({limit}; "
                    "activations.vllm.max_model_len)",
                )
        acts = engine.mean_activations(sequences, spans, layer_ids)
    finally:
        engine.close()
    write_activations(acts, layer_ids, dtype, responses, frames, outputs, info, engine.template)
