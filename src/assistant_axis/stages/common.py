"""What the stage modules share: the job log, the config keys errors name, the tables' columns, the model
manifest, replies rendered as the activations stage renders them, and the evaluation's engine session."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

from assistant_axis.artifacts import read_tensors, write_tensors
from assistant_axis.axis import load_axis, unit_rows
from assistant_axis.engines import open_engine
from assistant_axis.errors import AxisError, InputError, renamed
from assistant_axis.evaluate import watched_layers
from assistant_axis.interop import load_capping
from assistant_axis.manifest import model_path
from assistant_axis.models import DTYPES
from assistant_axis.plan.params import CapSetting

log = logging.getLogger("assistant_axis")
RESPONSE_COLUMNS = (
    "role",
    "prompt_index",
    "question_index",
    "question_id",
    "system_prompt",
    "question",
    "response",
    "n_response_tokens",
    "finish_reason",
)
# Written by generate since thinking models are handled; tables from before read as no reasoning.
OPTIONAL_RESPONSE_COLUMNS = ("reasoning",)
SCORE_COLUMNS = ("role", "prompt_index", "question_index", "score", "expected_score", "judge", "prompt_hash", "raw")
KEYS = ["role", "prompt_index", "question_index"]
# How the activations were rendered (see `ChatTemplate.metadata`): carried to the vectors and the axis.
RENDERING_KEYS = ("chat_template_kwargs", "chat_template_sha")


@contextmanager
def logged(log_path: str | None, threads: int | None = None) -> Iterator[None]:
    """Send logs and progress to the job's log file; report a user error as one line and exit 1. `threads`:
    the job's cores, which torch's own thread pool then uses (no more)."""
    if threads:
        torch.set_num_threads(threads)
    terminal = sys.stderr
    handle = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed below)
    if handle:
        sys.stderr = handle
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    try:
        yield
    except AxisError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=terminal)
        sys.exit(1)
    finally:
        sys.stderr = terminal
        if handle:
            handle.close()


# The config keys that set the library's arguments, so that an error names the key a user edits (the
# library's own errors name its arguments: errors.ArgumentError).
MODEL_KEYS = {
    "load_model.dtype": "model.dtype",
    "bundled_gguf.source": "model.source",
    "find_blocks.path": "model.blocks",
}
JUDGE_KEYS = {
    "make_judge.backend": "judge.backend",
    "make_judge.settings": "judge.transformers",
    "VLLMJudge.settings": "judge.vllm",
    "OpenAIJudge.settings": "judge.openai",
}
LAYER_KEYS = {"resolve_layers.layers": "activations.layers", "mean_activations.layers": "activations.layers"}


def config_keys(names: dict[str, str]):
    """Run the stage with its library errors renamed to the config keys in `names` (see errors.renamed)."""

    def wrap(stage):
        @functools.wraps(stage)
        def run(*args, **kwargs):
            with renamed("config", names):
                return stage(*args, **kwargs)

        return run

    return wrap


def model_info(path: str | Path) -> dict:
    """The model manifest `path` (`results/<model>/model.json`), its `path` the model to load from here (a
    path relative to the workflow directory made whole: see `models.model_path`)."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, "file", f"not a readable model manifest ({exc})") from exc
    if isinstance(info, dict) and isinstance(info.get("path"), str):
        info["path"] = model_path(path, info["path"])
    return info


def rendered_replies(
    template, paths: list[str], frames: list[pd.DataFrame]
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Every response of `frames` (read from `paths`) rendered as the activations stage renders it: the token
    ids of its conversation and the [start, end) span of the reply, in table order. A reply that cannot be
    located is an error naming its file and row."""
    sequences, spans = [], []
    for path, frame in zip(paths, frames, strict=True):
        reasoning = frame["reasoning"].fillna("") if "reasoning" in frame else [""] * len(frame)
        for i, (row, thought) in enumerate(zip(frame.itertuples(index=False), reasoning, strict=True)):
            messages = template.conversation(row.system_prompt, row.question)
            try:
                ids, start, end = template.reply_span(messages, row.response.strip(), thought)
            except InputError as exc:
                raise InputError(path, "response", f"row {i}: {exc}") from exc
            sequences.append(ids)
            spans.append((start, end))
    return sequences, spans


def write_activations(acts, layer_ids, dtype, paths, frames, outputs, info, template) -> None:
    """One activations file per role: `acts` rows in table order, stored in `dtype`."""
    offset = 0
    for path, frame, output in zip(paths, frames, outputs, strict=True):
        part = acts[offset : offset + len(frame)]
        offset += len(frame)
        role = str(frame["role"].iloc[0]) if len(frame) else Path(path).stem
        write_tensors(
            {"activations": part.to(DTYPES[dtype]), "layers": torch.tensor(layer_ids)},
            output,
            {
                "model": info["name"],
                "role": role,
                "hidden_size": acts.shape[-1],
                "n_responses": len(frame),
                **template.metadata(),
            },
        )


def axis_and_layer(axis_file: str, layer: int | None) -> tuple[torch.Tensor, list[int], int, dict]:
    """The axis, its layer list, the analysis layer (`None`: the middle one) and the axis metadata."""

    tensor, layers, meta = load_axis(axis_file)
    if layer is None:
        layer = layers[len(layers) // 2]
    if layer not in layers:
        raise InputError("config", "analysis.layer", f"layer {layer} is not in the axis ({layers[0]}..{layers[-1]})")
    return tensor, layers, layer, meta


def included_vectors(vector_files: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(role names, stacked vectors of the roles used in the axis, the default vector)."""
    names, stack, default = [], [], None
    for path in vector_files:
        tensors, meta = read_tensors(path, ["vector", "layers"])
        if meta.get("role") == "default":
            default = tensors["vector"].float()
        elif json.loads(meta.get("included", "true")):
            names.append(meta["role"])
            stack.append(tensors["vector"].float())
    if default is None or len(stack) < 2:
        raise InputError("vectors", "included", f"PCA needs the default vector and >= 2 roles, got {len(stack)}")
    return names, torch.stack(stack), default


def check_rendering(axis_meta: dict, axis_file: str, template_options: dict | None, stage: str) -> None:
    recorded = axis_meta.get("chat_template_kwargs", template_options or {})
    if recorded != (template_options or {}):
        raise InputError(
            axis_file,
            "chat_template_kwargs",
            f"the axis was rendered with {recorded}, the {stage} "
            f"would render with {template_options or {}} (model.chat_template_kwargs)",
        )


def sweep_configs(capping_files: list[str], info: dict) -> dict:
    """The calibrate stage's capping configs, by setting name (`late-p25`), checked against the model."""

    configs = {}
    for path in capping_files:
        config = load_capping(path, model_name=info["name"], hidden_size=info["hidden_size"], n_layers=info["n_layers"])
        if not {"range", "percentile"} <= config.metadata.keys():
            raise InputError(path, "range", "not a capping config of the calibrate stage (no range and percentile)")
        configs[CapSetting(config.metadata["range"], float(config.metadata["percentile"])).name] = config
    return configs


def evaluation_session(
    info, axis, axis_layers, configs, layer, backend, section, key, dtype, trust_remote_code, template_options
):
    """The evaluate engine's session over `configs` (by name), measuring `layer` and every capped layer."""

    _, watched = watched_layers(configs, layer)
    units = unit_rows(axis, axis_layers, watched, int(axis.shape[-1]), "axis")
    engine = open_engine(
        backend,
        info["path"],
        section,
        key,
        ["sessions"],
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        template_options=template_options,
        model_name=info["name"],
        progress=False,
    )
    return engine, engine.session(units, watched, configs)
