"""The figures of the analysis stages (matplotlib, headless); each is saved atomically by `save_figure`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the headless backend)
import pandas as pd  # noqa: E402

from assistant_axis.artifacts import save_figure  # noqa: E402

__all__ = ["pca_variance", "pca_scatter", "pca_layers", "stability", "thresholds", "tradeoff"]


def pca_variance(components: pd.DataFrame, layer: int, path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(components["component"], components["variance_ratio"], color="tab:blue", label="per component")
    ax.plot(components["component"], components["cumulative"], "o-", color="tab:orange", label="cumulative")
    ax.axhline(0.7, color="grey", ls="--", lw=1, label="70%")
    ax.set_xlabel("principal component")
    ax.set_ylabel("share of variance across role vectors")
    ax.set_title(f"PCA of the role vectors, layer {layer}")
    ax.legend()
    save_figure(fig, path)


def pca_scatter(roles: pd.DataFrame, layer: int, path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 6))
    points = ax.scatter(roles["pc1"], roles["pc2"], c=roles["axis_projection"], cmap="coolwarm", s=30)
    for row in roles.itertuples():
        ax.annotate(row.role, (row.pc1, row.pc2), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.margins(0.12)  # room for the labels of the outermost roles
    fig.colorbar(points, label="projection on the axis (larger = more Assistant-like)")
    ax.set_xlabel("PC1 (sign-aligned with the axis)")
    ax.set_ylabel("PC2")
    ax.set_title(f"Role vectors on the first two components, layer {layer}")
    save_figure(fig, path)


def pca_layers(summary: pd.DataFrame, path: str | Path) -> None:
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(summary["layer"], summary["pc1_cosine"], "o-", color="tab:blue", ms=3, label="cos(PC1, axis)")
    left.plot(summary["layer"], summary["pc1_variance"], "s-", color="tab:green", ms=3, label="PC1 variance share")
    left.set_ylim(0, 1.05)
    left.set_xlabel("layer")
    left.set_ylabel("cosine / variance share")
    right = left.twinx()
    right.plot(summary["layer"], summary["axis_norm"], "--", color="tab:red", label="axis norm")
    right.set_ylabel("axis norm")
    lines = left.get_lines() + right.get_lines()
    left.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")
    left.set_title("The axis and the role space's first component, per layer")
    save_figure(fig, path)


def stability(roles: pd.DataFrame, axis: pd.DataFrame, sizes: list[int], layer: int, path: str | Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    # The configured sizes make the curve; each role's own half split (n = half its replies) differs from
    # role to role, so it is shown per role rather than folded into the curve.
    per_n = roles[roles["n"].isin(sizes)].groupby("n")["cosine"]
    median, low, high = per_n.median(), per_n.quantile(0.1), per_n.quantile(0.9)
    left.plot(median.index, median.values, "o-", label="median over roles and repeats")
    left.fill_between(median.index, low.values, high.values, alpha=0.25, label="10th-90th percentile")
    halves = roles[roles["n"] == roles["n_available"] // 2].groupby("role")[["n", "cosine"]].median()
    left.scatter(halves["n"], halves["cosine"], marker="x", color="tab:grey", label="each role's half split")
    left.set_xscale("log", base=2)
    left.set_xlabel("responses per role vector (n)")
    left.set_ylabel("cosine between two disjoint n-subsets")
    left.set_title(f"Role vectors (relative to default), layer {layer}")
    left.legend(fontsize=8)
    per_layer = axis.groupby("layer")["cosine"]
    right.plot(per_layer.mean().index, per_layer.mean().values, "o-", ms=3)
    right.fill_between(per_layer.min().index, per_layer.min().values, per_layer.max().values, alpha=0.25)
    right.set_xlabel("layer")
    right.set_ylabel("cosine between axes from disjoint role halves")
    right.set_title("Axis split-half agreement")
    save_figure(fig, path)


def thresholds(percentiles: pd.DataFrame, capped: dict[str, tuple[list[int], list[float]]], path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(percentiles["layer"], percentiles["p5"], percentiles["p75"], alpha=0.2, label="default p5-p75")
    ax.plot(percentiles["layer"], percentiles["p50"], color="tab:blue", label="default median")
    for name, (layers, taus) in capped.items():
        ax.plot(layers, taus, "o-", ms=4, label=f"cap {name}")
    ax.set_xlabel("layer")
    ax.set_ylabel("projection of default replies on the unit axis")
    ax.set_title("Capping thresholds from the Assistant's own projections")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def tradeoff(summary: pd.DataFrame, path: str | Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row in summary.itertuples():
        left.scatter(row.accuracy, row.persona_adoption, s=50)
        left.annotate(
            row.setting, (row.accuracy, row.persona_adoption), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
    left.margins(0.15)  # room for the labels
    left.set_xlabel("accuracy on plain questions (capability proxy)")
    left.set_ylabel("persona adoption (share of replies judged 3)")
    left.set_title("Persona adoption vs capability")
    x = range(len(summary))
    right.bar([i - 0.2 for i in x], summary["projection_persona"], width=0.4, label="persona prompts")
    right.bar([i + 0.2 for i in x], summary["projection_plain"], width=0.4, label="plain prompts")
    right.set_xticks(list(x), summary["setting"], rotation=20, fontsize=8)
    right.set_ylabel("mean reply projection (monitor layer)")
    right.set_title("Where the replies sit on the axis")
    right.legend(fontsize=8)
    save_figure(fig, path)
