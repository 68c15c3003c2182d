"""One function per workflow stage: read the inputs, call the library, write the outputs atomically.

The Snakemake scripts in `workflow/scripts/` only unpack `snakemake.*` into these calls, so every
stage can also be run and tested from Python. Where to add a stage: a function here, a script, a rules
file included by the Snakefile, and its default resources in `plan.DEFAULT_RESOURCES`; `config_keys`
names the config keys that set the library arguments it passes, for its error messages.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch

from assistant_axis.artifacts import (
    read_parquet,
    read_tensors,
    write_html_table,
    write_json,
    write_parquet,
    write_pt,
    write_tensors,
)
from assistant_axis.axis import unit_vectors
from assistant_axis.errors import AxisError, InputError, renamed
from assistant_axis.models import DTYPES
from assistant_axis.provenance import describe_model, provenance

__all__ = [
    "logged",
    "prepare_model",
    "generate",
    "activations",
    "judge",
    "vectors",
    "axis",
    "pca",
    "stability",
    "calibrate",
    "evaluate",
    "RESPONSE_COLUMNS",
    "OPTIONAL_RESPONSE_COLUMNS",
    "SCORE_COLUMNS",
]

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
def logged(log_path: str | None) -> Iterator[None]:
    """Send logs and progress to the job's log file; report a user error as one line and exit 1."""
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
    "make_judge.settings": "judge.local",
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


def _model_info(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, "file", f"not a readable model manifest ({exc})") from exc


# ------------------------------------------------------------------------------------------------ stages


@config_keys(MODEL_KEYS)
def prepare_model(output: str, name: str, source: str, models_dir: str, trust_remote_code: bool = False) -> None:
    from assistant_axis.models import prepare_model as prepare

    info = prepare(name, source, models_dir, trust_remote_code)
    log.info("model %s ready at %s (%d layers, hidden %d)", name, info.path, info.n_layers, info.hidden_size)
    write_json(asdict(info), output)


@config_keys(
    {**MODEL_KEYS, "make_backend.name": "generate.backend", "TransformersBackend.batch_size": "generate.batch_size"}
)
def generate(
    model: str,
    outputs: list[str],
    jobs: list[dict],
    questions: list[dict],
    backend: str,
    settings: dict,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    template_options: dict | None = None,
    capture: dict | None = None,
    activation_outputs: list[str] | None = None,
) -> None:
    """Every (system prompt x question) pair of each job's role, one model load and one backend call.

    `jobs[i]` is `{"role", "system_prompts"}` and is written to `outputs[i]`. `template_options` are the
    chat template's (`model.chat_template_kwargs`); a thinking model's reasoning goes to its own column.
    `capture` (`{"layers", "dtype"}`, vLLM only) records each reply's mean activations as it is generated,
    written to `activation_outputs[i]` as the activations stage would write them.
    """
    from assistant_axis.backends import Sampling, make_backend, stable_seed

    if len(outputs) != len(jobs) or (capture is not None and len(activation_outputs or ()) != len(jobs)):
        raise InputError("workflow", "generate", f"{len(jobs)} roles but {len(outputs)} outputs")
    info = _model_info(model)
    recording = None
    if capture is not None:
        from assistant_axis.layers import resolve_layers

        if capture["dtype"] not in DTYPES:
            raise InputError("config", "activations.dtype", f"unknown dtype {capture['dtype']!r}")
        with renamed("config", {"resolve_layers.layers": "activations.layers"}):
            recording = (resolve_layers(capture["layers"], info["n_layers"]), DTYPES[capture["dtype"]])
    engine = make_backend(
        backend, settings, info["path"], dtype, trust_remote_code, template_options, info["name"], recording
    )
    keys, conversations, seeds = [], [], []
    for job in jobs:
        prompts = job["system_prompts"]
        for p in range(len(prompts)):
            for q in range(len(questions)):
                keys.append((job["role"], p, q))
                conversations.append(engine.template.conversation(prompts[p], questions[q]["question"]))
                # A seed per response, from its key: where the backend seeds requests one by one (vLLM,
                # servers), regenerating reproduces unchanged responses whichever job or shard runs them.
                seeds.append(stable_seed(job["role"], prompts[p], questions[q]["id"]) + settings.get("seed", 0))
    sampling = Sampling(
        settings.get("temperature", 0.7),
        settings.get("top_p", 0.9),
        settings.get("max_tokens", 512),
        settings.get("seed", 0) + stable_seed(*sorted(j["role"] for j in jobs)),
    )
    log.info("%d roles, %d responses with %s", len(jobs), len(conversations), backend)
    replies = engine.generate(conversations, sampling, seeds)
    frames = []
    for job, output in zip(jobs, outputs, strict=True):
        role, prompts = job["role"], job["system_prompts"]
        rows = [(key, reply) for key, reply in zip(keys, replies, strict=True) if key[0] == role]
        frame = pd.DataFrame(
            {
                "role": role,
                "prompt_index": [p for (_, p, _), _ in rows],
                "question_index": [q for (_, _, q), _ in rows],
                "question_id": [questions[q]["id"] for (_, _, q), _ in rows],
                "system_prompt": [prompts[p] for (_, p, _), _ in rows],
                "question": [questions[q]["question"] for (_, _, q), _ in rows],
                "response": [r.text for _, r in rows],
                "n_response_tokens": [r.n_tokens for _, r in rows],
                "finish_reason": [r.finish_reason for _, r in rows],
                "reasoning": [r.reasoning for _, r in rows],
            }
        )
        empty = int((frame["response"].str.strip() == "").sum())
        if empty:
            log.warning("role %s: %d empty responses (kept; they get no activations and no score)", role, empty)
        write_parquet(frame, output)
        frames.append(frame)
    if recording is not None:
        _write_captured(engine, recording[0], capture["dtype"], outputs, frames, activation_outputs, info)


def _write_captured(engine, layer_ids, dtype, outputs, frames, activation_outputs, info) -> None:
    """The activations recorded during generation (`frames`: the responses tables just written to
    `outputs`), written per role as the activations stage writes them; the log counts the replies whose
    mean differs from a separate pass's by design (cut by max_tokens, with reasoning)."""
    _write_activations(engine.captured, layer_ids, dtype, outputs, frames, activation_outputs, info, engine.template)
    cut = sum(int((frame["finish_reason"] == "length").sum()) for frame in frames)
    thought = sum(int(frame["reasoning"].fillna("").ne("").sum()) for frame in frames)
    log.info(
        "captured activations at %d layers for %d replies; %d were cut by max_tokens (their last token is "
        "not in the mean), %d have reasoning (in the mean, unlike a separate pass)",
        len(layer_ids),
        sum(len(frame) for frame in frames),
        cut,
        thought,
    )


def _rendered_replies(
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
    for all the given roles (`responses[i]` -> `outputs[i]`).

    Conversations render with `template_options` as generation rendered them; a thinking model's
    reasoning is rendered where the template puts it, before the reply, and is not part of the mean.
    Every reply is located before the model runs: one that cannot be is an error and nothing is written.
    `backend: vllm` takes the same means inside a vLLM engine (`settings`: `activations.vllm`).
    """
    from assistant_axis.activations import mean_activations, resolve_layers
    from assistant_axis.models import find_blocks, load_model, load_tokenizer
    from assistant_axis.templates import ChatTemplate

    if dtype not in DTYPES:
        raise InputError("config", "activations.dtype", f"unknown dtype {dtype!r}")
    frames = [read_parquet(path, RESPONSE_COLUMNS) for path in responses]
    info = _model_info(model)
    if backend == "vllm":
        template = ChatTemplate(load_tokenizer(info["path"], trust_remote_code), template_options, info["name"])
        layer_ids = resolve_layers(layers, info["n_layers"])
        sequences, spans = _rendered_replies(template, responses, frames)
        acts = _vllm_activations(
            info, sequences, spans, layer_ids, settings, compute_dtype, trust_remote_code, responses, frames
        )
    elif backend == "transformers":
        net, tokenizer = load_model(info["path"], compute_dtype, trust_remote_code=trust_remote_code)
        layer_ids = resolve_layers(layers, len(find_blocks(net, blocks)))
        template = ChatTemplate(tokenizer, template_options, info["name"])
        sequences, spans = _rendered_replies(template, responses, frames)
        acts = mean_activations(net, sequences, spans, layer_ids, batch_tokens=batch_tokens, blocks_path=blocks)
    else:
        raise InputError("config", "activations.backend", f"unknown backend {backend!r} (transformers or vllm)")
    _write_activations(acts, layer_ids, dtype, responses, frames, outputs, info, template)


def _vllm_activations(info, sequences, spans, layer_ids, settings, compute_dtype, trust_remote_code, paths, frames):
    """`vllm_mean_activations` in an engine started for this job; prefix caching off unless configured (a
    cached span token is not computed, so it could not be recorded)."""
    from assistant_axis.activations import vllm_mean_activations
    from assistant_axis.vllm_engine import recording_engine, vllm_engine_args

    engine = {"enable_prefix_caching": False, **(settings or {})}
    args = vllm_engine_args(info["path"], engine, "activations.vllm", compute_dtype, 0, trust_remote_code)
    llm = recording_engine(args, "activations.backend")
    limit = int(llm.llm_engine.model_config.max_model_len)
    where = [(path, row) for path, frame in zip(paths, frames, strict=True) for row in range(len(frame))]
    for (path, row), ids in zip(where, sequences, strict=True):
        if len(ids) + 1 > limit:  # the prompt and the one token a request must sample
            raise InputError(
                path,
                "response",
                f"row {row}: its conversation has {len(ids)} tokens, more than the engine's max_model_len "
                f"{limit} allows (activations.vllm.max_model_len)",
            )
    try:
        return vllm_mean_activations(llm, sequences, spans, layer_ids, source="activations.vllm")
    finally:
        llm.llm_engine.engine_core.shutdown()


def _write_activations(acts, layer_ids, dtype, paths, frames, outputs, info, template) -> None:
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


@config_keys({**JUDGE_KEYS, "load_model.dtype": "judge.local.dtype"})
def judge(
    responses: str, output: str, role: str, description: str, template: str, backend: str, settings: dict
) -> None:
    """Score every response of one role for role adherence (0-3)."""
    from assistant_axis.judge import JudgeItem, make_judge

    frame = read_parquet(responses, RESPONSE_COLUMNS)
    items = [JudgeItem(role, description, q, r) for q, r in zip(frame["question"], frame["response"], strict=True)]
    engine = make_judge(backend, settings, template)
    verdicts, name = engine.score(items), engine.name
    # A judge that answers but never with a score is misconfigured (wrong model or scoring): a rerun would
    # not help. (Failed requests never get here: the API client fails the job, their answers cached.)
    unreadable = [v for v in verdicts if v.score is None and not v.raw.startswith("empty response")]
    if unreadable and all(v.score is None for v in verdicts):
        raise InputError(
            responses,
            "judge",
            f"{name} answered {len(unreadable)} responses without a usable score ({unreadable[0].raw})",
        )
    scores = pd.DataFrame(
        {
            **{k: frame[k] for k in KEYS},
            "score": pd.array([v.score for v in verdicts], dtype="Int64"),
            "expected_score": pd.array([v.expected_score for v in verdicts], dtype="Float64"),
            "judge": name,
            "prompt_hash": [v.basis for v in verdicts],
            "raw": [v.raw for v in verdicts],
        }
    )
    counts = scores["score"].value_counts(dropna=False).sort_index().to_dict()
    log.info("role %s scores: %s", role, counts)
    write_parquet(scores, output)


def vectors(
    activations: str,
    output: str,
    role: str,
    scores: str | None,
    min_score: int,
    min_count: int,
    model: str | None = None,
) -> None:
    """The role's vector: mean activation of its qualifying responses (`default`: all of them).

    The activations are checked against the model manifest `model` (name, hidden size, layers)."""
    from assistant_axis.axis import role_vector

    tensors, meta = read_tensors(activations, ["activations", "layers"])
    acts = tensors["activations"].float()
    n_layers = len(tensors["layers"])
    if acts.dim() != 3 or acts.shape[1] != n_layers or meta.get("n_responses", str(len(acts))) != str(len(acts)):
        raise InputError(
            activations,
            "activations",
            f"shape {tuple(acts.shape)} does not match its {n_layers} layers and {meta.get('n_responses')} responses",
        )
    if model is not None:
        info = _model_info(model)
        if meta.get("model", info["name"]) != info["name"]:
            raise InputError(activations, "model", f"activations of model {meta['model']!r}, expected {info['name']!r}")
        if acts.shape[-1] != info["hidden_size"] or int(tensors["layers"].max()) >= info["n_layers"]:
            raise InputError(
                activations,
                "activations",
                f"hidden size {acts.shape[-1]} and layers up to "
                f"{int(tensors['layers'].max())}, but {info['name']} has hidden size "
                f"{info['hidden_size']} and {info['n_layers']} layers",
            )
    table = None
    if scores is not None:
        table = read_parquet(scores, SCORE_COLUMNS)
        wrong = table["score"][table["score"].notna() & ~table["score"].isin([0, 1, 2, 3])]
        if len(wrong):
            value = wrong.iloc[0].item() if hasattr(wrong.iloc[0], "item") else wrong.iloc[0]
            raise InputError(scores, "score", f"{value!r} in row {wrong.index[0]} is not a score 0-3")
        if len(table) != len(acts):
            raise InputError(
                activations, "activations", f"{len(acts)} rows but {scores} has {len(table)} scores: rerun activations"
            )
    vec = role_vector(role, acts, None if table is None else table["score"], min_score, min_count)
    if not vec.included:
        log.warning(
            "role %s left out of the axis: %d of %d responses have score >= %d (min_count %d)",
            role,
            vec.n_used,
            vec.n_responses,
            min_score,
            min_count,
        )
    described = describe_model(info) if model is not None else {"model": meta.get("model", "")}
    write_tensors(
        {"vector": vec.vector, "layers": tensors["layers"]},
        output,
        provenance(
            "role_vector",
            described,
            {k: meta[k] for k in RENDERING_KEYS if k in meta},
            role=role,
            n_responses=vec.n_responses,
            n_used=vec.n_used,
            included=vec.included,
        ),
    )


def axis(vector_files: list[str], output: str, output_pt: str, summary: str, model: str, config_hash: str) -> None:
    """`mean(default) - mean(included roles)` per layer, with the summary of which roles were used.

    `model` is the prepared model's manifest. Both files are indexed by block (`axis[i]` is block i's),
    NaN rows for blocks whose activations were not extracted; `axis.pt` is that tensor alone."""
    from assistant_axis.axis import by_block, compute_axis

    info = _model_info(model)
    model = info["name"]
    rows, role_vecs, default, layers, rendering = [], [], None, None, None
    for path in vector_files:
        tensors, meta = read_tensors(path, ["vector", "layers"])
        if meta.get("model", model) != model:
            raise InputError(path, "model", f"vector of model {meta.get('model')!r}, expected {model!r}")
        # Activations rendered with different template options (or templates) are not comparable.
        own = {k: meta.get(k) for k in RENDERING_KEYS}
        if rendering is None:
            rendering = own
        elif own != rendering:
            key = next(k for k in RENDERING_KEYS if own[k] != rendering[k])
            raise InputError(
                path,
                key,
                f"rendered with {own[key]!r}, but {vector_files[0]} with "
                f"{rendering[key]!r}: rerun activations for every role with one template setting",
            )
        if layers is None:
            layers, shape = tensors["layers"], tensors["vector"].shape
        elif not torch.equal(layers, tensors["layers"]) or tensors["vector"].shape != shape:
            raise InputError(
                path,
                "vector",
                f"shape {tuple(tensors['vector'].shape)} or layers differ from {vector_files[0]} ({tuple(shape)})",
            )
        included = json.loads(meta.get("included", "true"))
        rows.append(
            {
                "role": meta["role"],
                "n_responses": int(meta["n_responses"]),
                "n_used": int(meta["n_used"]),
                "included": bool(included),
            }
        )
        if meta["role"] == "default":
            default = tensors["vector"]
        elif included:
            role_vecs.append(tensors["vector"])
    if default is None:
        raise InputError("vectors", "default", "the default role's vector is missing")
    result = compute_axis(default, role_vecs)
    used = [r["role"] for r in rows if r["included"] and r["role"] != "default"]
    log.info("axis over %d layers from %d roles (%d left out)", len(layers), len(used), len(rows) - 1 - len(used))
    write_parquet(pd.DataFrame(rows), summary)
    if result.shape[-1] != info["hidden_size"] or int(layers.max()) >= info["n_layers"]:
        raise InputError(
            vector_files[0],
            "vector",
            f"hidden size {result.shape[-1]} and layers up to "
            f"{int(layers.max())}, but {model} has {info['hidden_size']} and {info['n_layers']} layers",
        )
    full = by_block(result, layers.tolist(), info["n_layers"])
    write_tensors(
        {"axis": full, "layers": layers},
        output,
        provenance(
            "axis", describe_model(info), rendering, layers=layers.tolist(), roles=used, config_hash=config_hash
        ),
    )
    write_pt(full, output_pt)


# ------------------------------------------------------------------------------------------------ analysis


def _axis_and_layer(axis_file: str, layer: int | None) -> tuple[torch.Tensor, list[int], int, dict]:
    """The axis, its layer list, the analysis layer (`None`: the middle one) and the axis metadata."""
    from assistant_axis.axis import load_axis

    tensor, layers, meta = load_axis(axis_file)
    if layer is None:
        layer = layers[len(layers) // 2]
    if layer not in layers:
        raise InputError("config", "analysis.layer", f"layer {layer} is not in the axis ({layers[0]}..{layers[-1]})")
    return tensor, layers, layer, meta


def _included_vectors(vector_files: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
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


def pca(
    vector_files: list[str],
    axis_file: str,
    layer: int | None,
    summary: str,
    components: str,
    roles: str,
    plots: dict[str, str],
) -> None:
    """PCA of the role vectors per layer; the analysis layer in detail (components, role loadings)."""
    from assistant_axis import plots as figures
    from assistant_axis.analysis import cosine
    from assistant_axis.analysis import pca as role_pca

    axis_tensor, layers, layer, _ = _axis_and_layer(axis_file, layer)
    names, vecs, _ = _included_vectors(vector_files)
    rows, results = [], {}
    for i, model_layer in enumerate(layers):  # the vectors' rows are the axis's layers, in order
        result = results[model_layer] = role_pca(vecs[:, i], axis_tensor[model_layer])
        cumulative = result.variance_ratio.cumsum(0)
        rows.append(
            {
                "layer": model_layer,
                "axis_norm": float(axis_tensor[model_layer].norm()),
                "pc1_cosine": cosine(result.components[0], axis_tensor[model_layer]),
                "pc1_variance": float(result.variance_ratio[0]),
                "components_for_70pct": int((cumulative < 0.7).sum()) + 1,
            }
        )
    table = pd.DataFrame(rows)
    i, result = layers.index(layer), results[layer]
    comp = pd.DataFrame(
        {
            "component": range(1, len(result.variance_ratio) + 1),
            "variance_ratio": result.variance_ratio.numpy(),
            "cumulative": result.variance_ratio.cumsum(0).numpy(),
        }
    )
    unit = axis_tensor[layer] / axis_tensor[layer].norm()
    loadings = pd.DataFrame(
        {
            "role": names,
            "pc1": result.scores[:, 0].numpy(),
            "pc2": result.scores[:, 1].numpy() if result.scores.shape[1] > 1 else 0.0,
            "axis_projection": (vecs[:, i] @ unit).numpy(),
        }
    )
    row = table[table["layer"] == layer].iloc[0]
    log.info(
        "layer %d: PC1 explains %.1f%% of role variance, cos(PC1, axis) = %.3f, %d components reach 70%%",
        layer,
        100 * row["pc1_variance"],
        row["pc1_cosine"],
        row["components_for_70pct"],
    )
    write_parquet(table, summary)
    write_parquet(comp, components)
    write_parquet(loadings, roles)
    figures.pca_variance(comp, layer, plots["variance"])
    figures.pca_scatter(loadings, layer, plots["scatter"])
    figures.pca_layers(table, plots["layers"])


def stability(
    activation_files: list[str],
    score_files: list[str],
    vector_files: list[str],
    axis_file: str,
    layer: int | None,
    sizes: list[int],
    repeats: int,
    seed: int,
    min_score: int,
    roles_table: str,
    axis_table: str,
    plot: str,
) -> None:
    """How many rollouts a role vector needs, and how stable the axis is across role halves."""
    from assistant_axis import plots as figures
    from assistant_axis.analysis import axis_split_cosines, split_cosines
    from assistant_axis.artifacts import read_layer, read_metadata

    _, layers, layer, _ = _axis_and_layer(axis_file, layer)
    index = layers.index(layer)
    generator = torch.Generator().manual_seed(seed)
    names, vecs, default = _included_vectors(vector_files)
    # Each file says whose it is: activations in their metadata, scores in their `role` column.
    scores_of = {}
    for path in score_files:
        frame = read_parquet(path, SCORE_COLUMNS)
        if frame["role"].nunique() != 1:
            raise InputError(path, "role", f"expected one role's scores, got {sorted(set(frame['role']))}")
        scores_of[str(frame["role"].iloc[0])] = (path, frame)
    rows = []
    for acts_path in activation_files:
        role = read_metadata(acts_path).get("role")
        if role == "default":  # the reference, not a subject
            continue
        if role not in scores_of:
            raise InputError(acts_path, "role", f"no scores among the inputs for role {role!r}")
        scores_path, scores = scores_of[role]
        acts = read_layer(acts_path, "activations", index).float()
        if len(scores) != len(acts):
            raise InputError(acts_path, "activations", f"{len(acts)} rows but {scores_path} has {len(scores)}")
        keep = torch.as_tensor((scores["score"].astype("Float64") >= min_score).fillna(False).to_numpy(dtype=bool))
        keep &= torch.isfinite(acts).all(dim=1)
        for n, r, cos, raw in split_cosines(acts[keep], default[index], sizes, repeats, generator):
            rows.append(
                {"role": role, "n_available": int(keep.sum()), "n": n, "repeat": r, "cosine": cos, "cosine_raw": raw}
            )
    table = pd.DataFrame(rows, columns=["role", "n_available", "n", "repeat", "cosine", "cosine_raw"])
    cosines = axis_split_cosines(default, vecs, repeats, generator)
    axis_rows = pd.DataFrame(
        [
            {"layer": model_layer, "repeat": r, "cosine": float(cosines[r, i])}
            for r in range(repeats)
            for i, model_layer in enumerate(layers)
        ]
    )
    if len(table):
        log.info(
            "layer %d: median split-half cosine by n: %s",
            layer,
            table.groupby("n")["cosine"].median().round(3).to_dict(),
        )
    write_parquet(table, roles_table)
    write_parquet(axis_rows, axis_table)
    figures.stability(table, axis_rows, sizes, layer, plot)


@config_keys({**MODEL_KEYS, **LAYER_KEYS, "layer_range.fractions": "capping.ranges"})
def calibrate(
    default_activations: str,
    axis_file: str,
    model: str,
    ranges: dict[str, list[float]],
    percentiles: list[float],
    table: str,
    configs: dict[str, str],
    plot: str,
    calibration: str = "token",
    responses: str | None = None,
    compute_dtype: str = "float32",
    batch_tokens: int = 8192,
    blocks: str | None = None,
    trust_remote_code: bool = False,
    template_options: dict | None = None,
) -> None:
    """Percentiles of the default replies' projections per layer, and one capping config per range x percentile.

    `model` is the prepared model's manifest (`model.json`): layer ranges are fractions of its depth.
    `calibration` is what a projection is: `token`, every token of every default reply (capping acts on every
    token), which loads the model and renders the replies of `responses` (the default role's table) as the
    activations stage does (`template_options`, `compute_dtype`, `batch_tokens`, `blocks`); or `reply`, each
    reply's mean activation from `default_activations`, one per reply, without the model.
    """
    from assistant_axis import plots as figures
    from assistant_axis.cap import CALIBRATION_PERCENTILES, CappingConfig, layer_range, percentile_thresholds
    from assistant_axis.plan.params import CapSetting

    if calibration not in ("token", "reply"):
        raise InputError("config", "capping.calibration", f"expected 'token' or 'reply', got {calibration!r}")
    info = _model_info(model)
    model, n_layers = info["name"], info["n_layers"]
    axis_tensor, layers, _, meta = _axis_and_layer(axis_file, None)
    tensors, act_meta = read_tensors(default_activations, ["activations", "layers"])
    if tensors["layers"].tolist() != layers:
        raise InputError(default_activations, "layers", "activation layers differ from the axis's: rerun the axis")
    if act_meta.get("model", model) != model or meta.get("model", model) != model:
        raise InputError(axis_file, "model", f"axis of model {meta.get('model')!r}, expected {model!r}")
    rendering = {k: v for k, v in read_tensors(axis_file)[1].items() if k in RENDERING_KEYS}  # as written
    settings = {name: CapSetting.parse(name) for name in configs}
    chosen_layers = {}  # checked before any model runs
    for name, setting in settings.items():
        chosen = layer_range(ranges[setting.range_name], n_layers)
        missing = [layer for layer in chosen if layer not in layers]
        if missing:
            raise InputError("config", f"capping.ranges.{setting.range_name}", f"layer {missing[0]} has no activations")
        chosen_layers[name] = chosen
    units = unit_vectors(axis_tensor[layers])
    if calibration == "reply":
        projections = torch.einsum("nlh,lh->nl", tensors["activations"].float(), units)
    else:
        from assistant_axis.activations import token_projections
        from assistant_axis.models import load_model
        from assistant_axis.templates import ChatTemplate

        if responses is None:
            raise InputError("workflow", "calibrate", "token calibration needs the default role's responses")
        frame = read_parquet(responses, RESPONSE_COLUMNS)
        if len(frame) != len(tensors["activations"]):
            raise InputError(
                responses,
                "response",
                f"{len(frame)} responses but {default_activations} has "
                f"{len(tensors['activations'])} rows: rerun the activations",
            )
        net, tokenizer = load_model(info["path"], compute_dtype, trust_remote_code=trust_remote_code)
        template = ChatTemplate(tokenizer, template_options, info["name"])
        for key, value in template.metadata().items():
            if key in rendering and rendering[key] != value:
                raise InputError(
                    axis_file,
                    key,
                    f"the axis was rendered with {rendering[key]!r}, calibration "
                    f"would render with {value!r}: rerun the activations with the same template",
                )
        sequences, spans = _rendered_replies(template, [responses], [frame])
        n_tokens = sum(max(end - start, 0) for start, end in spans)
        if not n_tokens:
            raise InputError(responses, "response", "no reply tokens to calibrate on (every reply is empty)")
        if n_tokens > 2**24:  # torch.quantile's limit
            raise InputError(
                responses,
                "response",
                f"{n_tokens} reply tokens, more than the 2^24 percentiles can be "
                "taken over: calibrate on fewer default replies, or with capping.calibration: reply",
            )
        projections = token_projections(
            net, sequences, spans, layers, units, batch_tokens=batch_tokens, blocks_path=blocks
        )
        del net
    n_used = int(torch.isfinite(projections).all(dim=1).sum())
    log.info("calibrating on %d %s projections per layer", n_used, calibration)
    wanted = sorted({*CALIBRATION_PERCENTILES, *percentiles})
    values = percentile_thresholds(projections, wanted)
    frame = pd.DataFrame(
        {
            "layer": layers,
            "calibration": calibration,
            "n": n_used,
            "mean": projections.nanmean(dim=0).numpy(),
            **{f"p{q:g}": values[k].numpy() for k, q in enumerate(wanted)},
        }
    )
    capped = {}
    for name, path in configs.items():
        setting, chosen = settings[name], chosen_layers[name]
        rows = [layers.index(layer) for layer in chosen]
        taus = values[wanted.index(setting.percentile)][rows]
        CappingConfig(chosen, units[rows], taus, model).save(
            path,
            **provenance(
                "capping",
                describe_model(info),
                rendering,
                percentile=setting.percentile,
                range=setting.range_name,
                fractions=list(ranges[setting.range_name]),
                calibration=calibration,
            ),
        )
        capped[name] = (chosen, taus.tolist())
        log.info("capping %s: layers %s, thresholds %s", name, chosen, [round(t, 2) for t in taus.tolist()])
    write_parquet(frame, table)
    figures.thresholds(frame, capped, plot)


def _evaluate_in_vllm(
    info,
    axis,
    axis_layers,
    configs,
    persona,
    capability,
    layer,
    sampling,
    judge,
    settings,
    dtype,
    trust_remote_code,
    template_options,
):
    from assistant_axis.axis import unit_rows
    from assistant_axis.evaluate import _watched, answer_every_setting_vllm
    from assistant_axis.models import load_tokenizer
    from assistant_axis.templates import ChatTemplate
    from assistant_axis.vllm_chat import VLLMSession
    from assistant_axis.vllm_engine import hooked_engine, vllm_engine_args

    log.info("evaluate: %d settings in one vLLM engine", len(configs) + 1)
    cap_layers, watched = _watched(configs, layer)
    units = unit_rows(axis, axis_layers, watched, int(axis.shape[-1]), "axis")
    args = vllm_engine_args(info["path"], settings or {}, "evaluate.vllm", dtype, sampling.seed, trust_remote_code)
    template = ChatTemplate(load_tokenizer(info["path"]), template_options, info["name"])
    session = VLLMSession(
        hooked_engine(args, "evaluate.vllm"),
        template,
        units,
        watched,
        {name: c.normalized() for name, c in configs.items()},
        sampling=sampling,
    )
    try:
        return answer_every_setting_vllm(session, persona, capability, layer, sampling, judge, cap_layers)
    finally:
        session.close()


def _check_rendering(axis_meta: dict, axis_file: str, template_options: dict | None, stage: str) -> None:
    recorded = axis_meta.get("chat_template_kwargs", template_options or {})
    if recorded != (template_options or {}):
        raise InputError(
            axis_file,
            "chat_template_kwargs",
            f"the axis was rendered with {recorded}, the {stage} "
            f"would render with {template_options or {}} (model.chat_template_kwargs)",
        )


def _sweep_configs(capping_files: list[str], info: dict) -> dict:
    """The calibrate stage's capping configs, by setting name (`late-p25`), checked against the model."""
    from assistant_axis.interop import load_capping
    from assistant_axis.plan.params import CapSetting

    configs = {}
    for path in capping_files:
        config = load_capping(path, model_name=info["name"], hidden_size=info["hidden_size"], n_layers=info["n_layers"])
        if not {"range", "percentile"} <= config.metadata.keys():
            raise InputError(path, "range", "not a capping config of the calibrate stage (no range and percentile)")
        configs[CapSetting(config.metadata["range"], float(config.metadata["percentile"])).name] = config
    return configs


@config_keys({**MODEL_KEYS, **JUDGE_KEYS, "TransformersBackend.batch_size": "evaluate.batch_size"})
def evaluate(
    model: str,
    axis_file: str,
    capping_files: list[str],
    prompts_file: str,
    capability_file: str,
    n_prompts: int | None,
    sampling: dict,
    batch_size: int,
    layer: int | None,
    judge: dict,
    sweep: dict,
    responses: str,
    summary: str,
    plot: str,
    pareto: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    template_options: dict | None = None,
    backend: str = "transformers",
    vllm: dict | None = None,
) -> None:
    """Every persona and capability prompt, uncapped and under each capping config of the sweep: replies,
    judge scores, checks, projections, firing; then the sweep's table (estimates with bootstrap intervals,
    Pareto front, the recommended setting by `sweep`'s rule). `backend` "vllm" runs every setting through
    one vLLM engine (`vllm` its settings)."""
    from assistant_axis import plots as figures
    from assistant_axis.backends import Sampling, TransformersBackend
    from assistant_axis.capability import load_capability
    from assistant_axis.evaluate import UNCAPPED, answer_every_setting, first_of_each_category, load_eval_prompts
    from assistant_axis.judge import make_judge
    from assistant_axis.models import load_model
    from assistant_axis.sweep import sweep_table
    from assistant_axis.templates import ChatTemplate

    axis_tensor, layers, layer, meta = _axis_and_layer(axis_file, layer)
    _check_rendering(meta, axis_file, template_options, "evaluation")
    info = _model_info(model)
    persona = first_of_each_category(load_eval_prompts(prompts_file), n_prompts)
    capability = first_of_each_category(load_capability(capability_file), n_prompts)
    configs = _sweep_configs(capping_files, info)
    engine = make_judge(judge["backend"], judge["settings"], judge["template"])
    reply_sampling = Sampling(sampling["temperature"], sampling["top_p"], sampling["max_tokens"], sampling["seed"])
    log.info(
        "evaluate: %d persona and %d capability prompts, %d settings", len(persona), len(capability), len(configs) + 1
    )
    if backend == "vllm":
        table = _evaluate_in_vllm(
            info,
            axis_tensor,
            layers,
            configs,
            persona,
            capability,
            layer,
            reply_sampling,
            engine,
            vllm,
            dtype,
            trust_remote_code,
            template_options,
        )
    else:
        net, tokenizer = load_model(info["path"], dtype, trust_remote_code=trust_remote_code)
        template = ChatTemplate(tokenizer, template_options, info["name"])
        generator = TransformersBackend(net, template, batch_size)
        table = answer_every_setting(
            generator, persona, capability, configs, axis_tensor, layer, reply_sampling, engine
        )
    result = sweep_table(
        table,
        [UNCAPPED, *configs],
        sweep["bootstrap"],
        sweep["confidence"],
        sweep["max_cost_points"],
        sampling["seed"],
    )
    result["monitor_layer"] = layer
    shown = [
        "setting",
        "persona_adoption",
        "adoption_reduction",
        "accuracy",
        "capability_cost",
        "fired",
        "pareto",
        "recommended",
    ]
    log.info("evaluation:\n%s", result[shown].to_string(index=False))
    pick = result.loc[result["recommended"], "setting"].tolist()
    log.info(
        "recommended: %s",
        pick[0]
        if pick
        else f"none (no setting reduces adoption within {sweep['max_cost_points']:g} points of capability)",
    )
    write_parquet(table, responses)
    write_parquet(result, summary)
    figures.sweep(result, plot)
    write_html_table(
        _pareto_view(result),
        pareto,
        f"Per setting, with {sweep['confidence']:.0%} bootstrap intervals over prompts ({sweep['bootstrap']} "
        f"resamples). Recommended: the largest adoption reduction whose capability cost is at most "
        f"{sweep['max_cost_points']:g} accuracy points: {pick[0] if pick else 'none meets the rule'}.",
    )


def _pareto_view(result: pd.DataFrame) -> pd.DataFrame:
    """The sweep table as people read it: points, each with its interval."""

    def points(name: str) -> list[str]:
        return [
            f"{v * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}]" if v == v else "-"  # NaN: the uncapped cap
            for v, lo, hi in zip(result[name], result[f"{name}_low"], result[f"{name}_high"], strict=True)
        ]

    return pd.DataFrame(
        {
            "setting": result["setting"],
            "adoption %": points("persona_adoption"),
            "adoption reduction (pts)": points("adoption_reduction"),
            "accuracy %": points("accuracy"),
            "capability cost (pts)": points("capability_cost"),
            "cap fired %": points("fired"),
            "Pareto": result["pareto"],
            "recommended": result["recommended"],
        }
    )


@config_keys({**MODEL_KEYS, "TransformersBackend.batch_size": "evaluate.batch_size"})
def drift(
    model: str,
    axis_file: str,
    capping_files: list[str],
    default_activations: str,
    scenarios_file: str,
    n_scenarios: int | None,
    max_turns: int | None,
    settings: list[str] | None,
    sampling: dict,
    batch_size: int,
    layer: int | None,
    percentile: float,
    last_turns: int,
    transcripts: str,
    trajectories: str,
    summary: str,
    plot: str,
    table: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    template_options: dict | None = None,
) -> None:
    """The scripted multi-turn scenarios, uncapped and under each capping config in `settings` (None: all):
    transcripts, per-turn projections (as `assistant-axis project` computes them), and how far each setting
    lets the Assistant drift (`tau`: the `percentile` of the default replies' projections at `layer`)."""
    from assistant_axis import drift as conversations
    from assistant_axis import plots as figures
    from assistant_axis.backends import Sampling, TransformersBackend
    from assistant_axis.evaluate import UNCAPPED, first_of_each_category
    from assistant_axis.models import load_model
    from assistant_axis.templates import ChatTemplate

    axis_tensor, layers, layer, meta = _axis_and_layer(axis_file, layer)
    _check_rendering(meta, axis_file, template_options, "drift stage")
    info = _model_info(model)
    configs = _sweep_configs(capping_files, info)
    chosen = list(configs) if settings is None else [s for s in settings if s != UNCAPPED]
    unknown = [s for s in chosen if s not in configs]
    if unknown:
        raise InputError(
            "config",
            "evaluate.drift.settings",
            f"unknown setting {unknown[0]!r} (known: {', '.join([UNCAPPED, *configs])})",
        )
    scenarios = first_of_each_category(conversations.load_scenarios(scenarios_file), n_scenarios)
    scenarios = [replace(s, turns=s.turns[:max_turns]) for s in scenarios]
    acts, act_meta = read_tensors(default_activations, ["activations", "layers"])
    if acts["layers"].tolist() != layers:
        raise InputError(default_activations, "layers", "activation layers differ from the axis's: rerun the axis")
    unit = unit_vectors(axis_tensor[layer : layer + 1])[0]
    default_projections = acts["activations"][:, layers.index(layer)].float() @ unit
    default_projections = default_projections[torch.isfinite(default_projections)]
    tau = float(torch.quantile(default_projections, percentile / 100))
    net, tokenizer = load_model(info["path"], dtype, trust_remote_code=trust_remote_code)
    template = ChatTemplate(tokenizer, template_options, info["name"])
    generator = TransformersBackend(net, template, batch_size, progress=False)
    reply_sampling = Sampling(sampling["temperature"], sampling["top_p"], sampling["max_tokens"], sampling["seed"])
    cap_layers = sorted({i for name in chosen for i in configs[name].layers})
    watched = sorted({layer, *cap_layers})
    said, projected = [], []
    for setting in [UNCAPPED, *chosen]:
        config = configs.get(setting)
        log.info("drift: %d scenarios under %s", len(scenarios), setting)
        talks = conversations.run_scenarios(generator, scenarios, reply_sampling, config)
        frames = conversations.trajectories(net, template, talks, axis_tensor, layers, watched, config)
        for scenario, talk, frame in zip(scenarios, talks, frames, strict=True):
            said += [
                {"setting": setting, "scenario": scenario.id, "category": scenario.category, "turn": i, **m}
                for i, m in enumerate(talk)
            ]
            projected.append(frame.assign(setting=setting, scenario=scenario.id, category=scenario.category))
    spoken, paths = pd.DataFrame(said), pd.concat(projected, ignore_index=True)
    paths = paths[["setting", "scenario", "category", "turn", "role", "layer", "projection", "n_chars"]]
    result = conversations.summarize_drift(paths, layer, tau, last_turns)
    log.info(
        "drift (layer %d, tau %.3g = p%g of the default replies):\n%s",
        layer,
        tau,
        percentile,
        result.to_string(index=False),
    )
    write_parquet(spoken, transcripts)
    write_parquet(paths, trajectories)
    write_parquet(result, summary)
    figures.drift(paths, layer, tau, plot)
    write_html_table(
        result,
        table,
        f"Assistant turns' projection at layer {layer}: first turn, mean of the last {last_turns}, the drop "
        f"between them, and the share of turns below tau = {tau:.3g} (p{percentile:g} of the default replies).",
    )
