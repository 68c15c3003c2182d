"""The figures of the analysis stages (matplotlib, headless); each is saved atomically by `save_figure`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the headless backend)
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from assistant_axis.artifacts import save_figure  # noqa: E402

__all__ = ["pca_variance", "pca_scatter", "pca_layers", "stability", "thresholds", "sweep", "drift"]


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


def _errors(table: pd.DataFrame, name: str, scale: float = 1.0) -> list:
    """Error bar lengths below and above each estimate (an interval that misses its estimate draws none)."""
    below = (table[name] - table[f"{name}_low"]).clip(lower=0) * scale
    above = (table[f"{name}_high"] - table[name]).clip(lower=0) * scale
    return [below.fillna(0).to_numpy(), above.fillna(0).to_numpy()]


def sweep(summary: pd.DataFrame, path: str | Path) -> None:
    """Left: capability cost vs adoption reduction per capped setting, with intervals; the Pareto front as a
    line, the recommendation ringed. Right: adoption and accuracy per setting, with intervals."""
    capped = summary.iloc[1:]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.axhline(0, color="grey", lw=0.8)
    left.axvline(0, color="grey", lw=0.8)
    left.errorbar(
        capped["capability_cost"] * 100,
        capped["adoption_reduction"] * 100,
        xerr=_errors(capped, "capability_cost", 100),
        yerr=_errors(capped, "adoption_reduction", 100),
        fmt="o",
        color="tab:blue",
        ecolor="lightsteelblue",
        capsize=3,
    )
    front = capped[capped["pareto"]].sort_values("capability_cost")
    left.plot(
        front["capability_cost"] * 100, front["adoption_reduction"] * 100, color="tab:red", lw=1.5, label="Pareto front"
    )
    points = capped.assign(
        x=(capped["capability_cost"] * 100).round(6), y=(capped["adoption_reduction"] * 100).round(6)
    )
    for (x, y), together in points.groupby(["x", "y"], sort=False):  # settings at one point share a label
        left.annotate(", ".join(together["setting"]), (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    picked = capped[capped["recommended"]]
    if len(picked):
        left.scatter(
            picked["capability_cost"] * 100,
            picked["adoption_reduction"] * 100,
            s=220,
            facecolors="none",
            edgecolors="tab:green",
            lw=2,
            label="recommended",
            zorder=3,
        )
    left.set_xlabel("capability cost (accuracy points lost vs uncapped)")
    left.set_ylabel("adoption reduction (points vs uncapped)")
    left.set_title("The capping sweep (95% bootstrap intervals)")
    left.legend(fontsize=8)
    x = range(len(summary))
    right.bar(
        [i - 0.2 for i in x],
        summary["persona_adoption"],
        width=0.4,
        yerr=_errors(summary, "persona_adoption"),
        label="persona adoption",
        capsize=2,
    )
    right.bar(
        [i + 0.2 for i in x],
        summary["accuracy"],
        width=0.4,
        yerr=_errors(summary, "accuracy"),
        label="capability accuracy",
        capsize=2,
    )
    right.set_xticks(list(x), summary["setting"], rotation=30, fontsize=8)
    right.set_ylim(0, 1.3)
    right.set_title("Per setting")
    right.legend(fontsize=8, ncol=2, loc="upper center")
    save_figure(fig, path)


def drift(frame: pd.DataFrame, layer: int, tau: float, path: str | Path) -> None:
    """Per scenario category, the assistant turns' mean projection at `layer` per setting, tau dashed."""
    replies = frame[(frame["role"] == "assistant") & (frame["layer"] == layer)].copy()
    replies["reply"] = replies.groupby(["setting", "scenario"])["turn"].rank(method="first").astype(int)
    categories = list(dict.fromkeys(replies["category"]))
    fig, axes = plt.subplots(1, len(categories), figsize=(4 * len(categories), 3.8), sharey=True, squeeze=False)
    for ax, category in zip(axes[0], categories, strict=True):
        part = replies[replies["category"] == category]
        for setting, lines in part.groupby("setting", sort=False):
            mean = lines.groupby("reply")["projection"].mean()
            ax.plot(mean.index, mean.values, marker="o", label=setting)
        ax.axhline(tau, color="grey", ls="--", lw=1)
        ax.set_title(category)
        ax.set_xlabel("assistant turn")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel(f"reply projection, layer {layer}")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Drift over a conversation (dashed: tau, the default replies' percentile)")
    save_figure(fig, path)
