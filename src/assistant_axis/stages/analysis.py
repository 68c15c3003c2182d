"""pca and stability: the role vectors' principal components, and how stable vectors and axis are."""

from __future__ import annotations

import pandas as pd
import torch

from assistant_axis import plots as figures
from assistant_axis.analysis import axis_split_cosines, cosine, split_cosines
from assistant_axis.analysis import pca as role_pca
from assistant_axis.artifacts import read_layer, read_metadata, read_parquet, write_parquet
from assistant_axis.errors import InputError
from assistant_axis.stages.common import SCORE_COLUMNS, axis_and_layer, included_vectors, log


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

    axis_tensor, layers, layer, _ = axis_and_layer(axis_file, layer)
    names, vecs, _ = included_vectors(vector_files)
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

    _, layers, layer, _ = axis_and_layer(axis_file, layer)
    index = layers.index(layer)
    generator = torch.Generator().manual_seed(seed)
    names, vecs, default = included_vectors(vector_files)
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
