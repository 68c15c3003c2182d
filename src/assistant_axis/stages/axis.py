"""vectors and axis: each role's vector, then the axis from the default and the role vectors."""

from __future__ import annotations

import json

import pandas as pd
import torch

from assistant_axis.artifacts import read_parquet, read_tensors, write_parquet, write_pt, write_tensors
from assistant_axis.axis import by_block, compute_axis, role_vector
from assistant_axis.errors import InputError
from assistant_axis.provenance import describe_model, provenance
from assistant_axis.stages.common import RENDERING_KEYS, SCORE_COLUMNS, log, model_info


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
        info = model_info(model)
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

    info = model_info(model)
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
