"""One function per workflow stage: read the inputs, call the library, write the outputs atomically.

The Snakemake scripts in `workflow/scripts/` only unpack `snakemake.*` into these calls, so every
stage can also be run and tested from Python.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from assistant_axis.artifacts import atomic_path, read_parquet, read_tensors, write_json, write_parquet, write_tensors
from assistant_axis.errors import AxisError, InputError

__all__ = ["logged", "prepare_model", "generate", "activations", "judge", "vectors", "axis",
           "RESPONSE_COLUMNS", "SCORE_COLUMNS"]

log = logging.getLogger("assistant_axis")
RESPONSE_COLUMNS = ("role", "prompt_index", "question_index", "question_id", "system_prompt", "question",
                    "response", "n_response_tokens", "finish_reason")
SCORE_COLUMNS = ("role", "prompt_index", "question_index", "score", "expected_score", "judge", "prompt_hash", "raw")
KEYS = ["role", "prompt_index", "question_index"]
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextmanager
def logged(log_path: str | None) -> Iterator[None]:
    """Send logs and progress to the job's log file; report a user error as one line and exit 1."""
    terminal = sys.stderr
    handle = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed below)
    if handle:
        sys.stderr = handle
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
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


def _model_info(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, "file", f"not a readable model manifest ({exc})") from exc


# ------------------------------------------------------------------------------------------------ stages


def prepare_model(output: str, name: str, source: str, models_dir: str, trust_remote_code: bool = False) -> None:
    from assistant_axis.models import prepare_model as prepare

    info = prepare(name, source, models_dir, trust_remote_code)
    log.info("model %s ready at %s (%d layers, hidden %d)", name, info.path, info.n_layers, info.hidden_size)
    write_json(asdict(info), output)


def generate(model: str, outputs: list[str], jobs: list[dict], questions: list[dict], backend: str,
             settings: dict, dtype: str = "float32", trust_remote_code: bool = False) -> None:
    """Every (system prompt x question) pair of each job's role, one model load and one backend call.

    `jobs[i]` is `{"role", "system_prompts"}` and is written to `outputs[i]`.
    """
    from assistant_axis.backends import Sampling, make_backend, stable_seed
    from assistant_axis.templates import build_messages

    if len(outputs) != len(jobs):
        raise InputError("workflow", "generate", f"{len(jobs)} roles but {len(outputs)} outputs")
    info = _model_info(model)
    engine = make_backend(backend, settings, info["path"], dtype, trust_remote_code)
    system_role = getattr(engine, "system_role", True)
    keys, conversations, seeds = [], [], []
    for job in jobs:
        prompts = job["system_prompts"]
        for p in range(len(prompts)):
            for q in range(len(questions)):
                keys.append((job["role"], p, q))
                conversations.append(build_messages(prompts[p], questions[q]["question"], system_role))
                # A seed per response, from its key: where the backend seeds requests one by one (vLLM,
                # servers), regenerating reproduces unchanged responses whichever job or shard runs them.
                seeds.append(stable_seed(job["role"], prompts[p], questions[q]["id"]) + settings.get("seed", 0))
    sampling = Sampling(settings.get("temperature", 0.7), settings.get("top_p", 0.9), settings.get("max_tokens", 512),
                        settings.get("seed", 0) + stable_seed(*sorted(j["role"] for j in jobs)))
    log.info("%d roles, %d responses with %s", len(jobs), len(conversations), backend)
    replies = engine.generate(conversations, sampling, seeds)
    for job, output in zip(jobs, outputs, strict=True):
        role, prompts = job["role"], job["system_prompts"]
        rows = [(key, reply) for key, reply in zip(keys, replies, strict=True) if key[0] == role]
        frame = pd.DataFrame({
            "role": role,
            "prompt_index": [p for (_, p, _), _ in rows],
            "question_index": [q for (_, _, q), _ in rows],
            "question_id": [questions[q]["id"] for (_, _, q), _ in rows],
            "system_prompt": [prompts[p] for (_, p, _), _ in rows],
            "question": [questions[q]["question"] for (_, _, q), _ in rows],
            "response": [r.text for _, r in rows],
            "n_response_tokens": [r.n_tokens for _, r in rows],
            "finish_reason": [r.finish_reason for _, r in rows],
        })
        empty = int((frame["response"].str.strip() == "").sum())
        if empty:
            log.warning("role %s: %d empty responses (kept; they get no activations and no score)", role, empty)
        write_parquet(frame, output)


def activations(model: str, responses: list[str], outputs: list[str], layers, dtype: str = "float32",
                compute_dtype: str = "float32", batch_tokens: int = 8192, blocks: str | None = None,
                trust_remote_code: bool = False) -> None:
    """Per-response mean activation over the response's tokens at every requested layer; one model load
    for all the given roles (`responses[i]` -> `outputs[i]`)."""
    from assistant_axis.activations import mean_activations, resolve_layers
    from assistant_axis.models import find_blocks, load_model
    from assistant_axis.templates import build_messages, response_span, supports_system_role

    if dtype not in STORAGE_DTYPES:
        raise InputError("config", "activations.dtype", f"unknown dtype {dtype!r}")
    frames = [read_parquet(path, RESPONSE_COLUMNS) for path in responses]
    info = _model_info(model)
    net, tokenizer = load_model(info["path"], compute_dtype, trust_remote_code=trust_remote_code)
    layer_ids = resolve_layers(layers, len(find_blocks(net, blocks)))
    system_role = supports_system_role(tokenizer)
    sequences, spans = [], []
    for frame in frames:
        for row in frame.itertuples(index=False):
            messages = build_messages(row.system_prompt, row.question, system_role)
            ids, start, end = response_span(tokenizer, messages, row.response if row.response.strip() else "")
            sequences.append(ids)
            spans.append((start, end))
    acts = mean_activations(net, sequences, spans, layer_ids, batch_tokens=batch_tokens, blocks_path=blocks)
    offset = 0
    for path, frame, output in zip(responses, frames, outputs, strict=True):
        part = acts[offset : offset + len(frame)]
        offset += len(frame)
        role = str(frame["role"].iloc[0]) if len(frame) else Path(path).stem
        write_tensors(
            {"activations": part.to(STORAGE_DTYPES[dtype]), "layers": torch.tensor(layer_ids)},
            output,
            {"model": info["name"], "role": role, "hidden_size": acts.shape[-1], "n_responses": len(frame)},
        )


def judge(responses: str, output: str, role: str, description: str, template: str, backend: str,
          settings: dict) -> None:
    """Score every response of one role for role adherence (0-3)."""
    from assistant_axis.judge import (
        DEFAULT_SYSTEM,
        EmbeddingJudge,
        EmbeddingThresholds,
        JudgeItem,
        Verdict,
        prompt_hash,
        render_prompt,
    )

    frame = read_parquet(responses, RESPONSE_COLUMNS)
    items = [JudgeItem(role, description, q, r) for q, r in zip(frame["question"], frame["response"], strict=True)]
    prompts = [render_prompt(template, it) for it in items]
    # An empty response has nothing to judge, whichever the backend: it keeps a null score and its reason.
    scored = [i for i, it in enumerate(items) if it.response.strip()]
    if backend == "embedding":
        engine = EmbeddingJudge(EmbeddingThresholds(**settings))
        found = engine.score([items[i] for i in scored])
        # This judge reads no prompt: hash what decides its scores (settings and the role's text).
        hashes = [prompt_hash(engine.settings_hash() + description)] * len(items)
    elif backend in ("local", "openai"):
        if backend == "local":
            from assistant_axis.judge import LocalJudge
            from assistant_axis.models import load_model

            source = settings.get("model", "")
            if not source:
                raise InputError("config", "judge.local.model", "the local judge needs a model")
            net, tokenizer = load_model(source, settings.get("dtype", "float32"))
            engine = LocalJudge(net, tokenizer, f"local:{source}", settings.get("batch_size", 8),
                                settings.get("system", DEFAULT_SYSTEM))
        else:
            from assistant_axis.judge import OpenAIJudge

            engine = OpenAIJudge(settings)
        found = engine.score_prompts([prompts[i] for i in scored])
        hashes = [prompt_hash(p) for p in prompts]
    else:
        raise InputError("config", "judge.backend", f"unknown judge backend {backend!r}")
    name = engine.name
    verdicts = [Verdict(None, None, "empty response")] * len(items)
    for i, verdict in zip(scored, found, strict=True):
        verdicts[i] = verdict
    scores = pd.DataFrame({
        **{k: frame[k] for k in KEYS},
        "score": pd.array([v.score for v in verdicts], dtype="Int64"),
        "expected_score": pd.array([v.expected_score for v in verdicts], dtype="Float64"),
        "judge": name,
        "prompt_hash": hashes,
        "raw": [v.raw for v in verdicts],
    })
    counts = scores["score"].value_counts(dropna=False).sort_index().to_dict()
    log.info("role %s scores: %s", role, counts)
    write_parquet(scores, output)


def vectors(activations: str, output: str, role: str, scores: str | None, min_score: int, min_count: int) -> None:
    """The role's vector: mean activation of its qualifying responses (`default`: all of them)."""
    from assistant_axis.axis import role_vector

    tensors, meta = read_tensors(activations, ["activations", "layers"])
    acts = tensors["activations"].float()
    table = None
    if scores is not None:
        table = read_parquet(scores, SCORE_COLUMNS)
        if len(table) != len(acts):
            raise InputError(activations, "activations",
                             f"{len(acts)} rows but {scores} has {len(table)} scores: rerun activations")
    vec = role_vector(role, acts, None if table is None else table["score"], min_score, min_count)
    if not vec.included:
        log.warning("role %s left out of the axis: %d of %d responses have score >= %d (min_count %d)",
                    role, vec.n_used, vec.n_responses, min_score, min_count)
    write_tensors({"vector": vec.vector, "layers": tensors["layers"]}, output,
                  {"role": role, "model": meta.get("model", ""), "n_responses": vec.n_responses,
                   "n_used": vec.n_used, "included": vec.included})


def axis(vector_files: list[str], output: str, output_pt: str, summary: str, model: str, config_hash: str) -> None:
    """`mean(default) - mean(included roles)` per layer, with the summary of which roles were used."""
    from assistant_axis.axis import compute_axis

    rows, role_vecs, default, layers = [], [], None, None
    for path in vector_files:
        tensors, meta = read_tensors(path, ["vector", "layers"])
        if layers is None:
            layers, shape = tensors["layers"], tensors["vector"].shape
        elif not torch.equal(layers, tensors["layers"]) or tensors["vector"].shape != shape:
            raise InputError(path, "vector", f"shape {tuple(tensors['vector'].shape)} or layers differ from "
                             f"{vector_files[0]} ({tuple(shape)})")
        if meta.get("model", model) != model:
            raise InputError(path, "model", f"vector of model {meta.get('model')!r}, expected {model!r}")
        included = json.loads(meta.get("included", "true"))
        rows.append({"role": meta["role"], "n_responses": int(meta["n_responses"]),
                     "n_used": int(meta["n_used"]), "included": bool(included)})
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
    write_tensors({"axis": result, "layers": layers}, output,
                  {"model": model, "layers": layers.tolist(), "roles": used, "config_hash": config_hash})
    with atomic_path(output_pt, ".pt") as tmp:
        torch.save(result.clone(), tmp)
