"""Choosing the cap: per-setting estimates with bootstrap intervals, the Pareto front, and a stated rule.

The evaluation answers the same prompts under every setting, so a setting's difference from the uncapped
model (adoption reduction, capability cost) is a paired difference: the bootstrap resamples prompts and
takes both settings' replies to each resampled prompt. Intervals are percentile intervals.

A setting is on the Pareto front when no other one reduces adoption at least as much at no higher
capability cost, and one of the two strictly. The recommended setting is the one with the largest
adoption reduction (above zero) whose capability cost stays at most `max_cost_points` accuracy points.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["bootstrap_ci", "paired_ci", "pareto_front", "recommend", "sweep_table"]


def _resampled_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)


def _interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(values, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (NaN dropped; no values: NaN, NaN)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    return _interval(_resampled_means(values, n_boot, seed), confidence)


def paired_ci(a, b, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean(a - b), low, high) over the pairs where both are known: prompts resampled with both replies."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diff = diff[~np.isnan(diff)]
    if not len(diff):
        return float("nan"), float("nan"), float("nan")
    return (float(diff.mean()), *_interval(_resampled_means(diff, n_boot, seed), confidence))


def pareto_front(cost, gain) -> list[bool]:
    """For each point, whether no other point has cost <= and gain >= with one of them strict."""
    cost, gain = np.asarray(cost, dtype=float), np.asarray(gain, dtype=float)
    front = []
    for c, g in zip(cost, gain, strict=True):
        dominated = ((cost <= c) & (gain >= g) & ((cost < c) | (gain > g))).any()
        front.append(bool(not dominated and np.isfinite(c) and np.isfinite(g)))
    return front


def recommend(table: pd.DataFrame, max_cost_points: float) -> str | None:
    """The capped setting with the largest adoption reduction > 0 whose capability cost (points) is at most
    `max_cost_points`; ties go to the lower cost. None when no setting meets the rule."""
    eligible = table[
        (table["setting"] != table["setting"].iloc[0])
        & (table["adoption_reduction"] > 0)
        & (table["capability_cost"] * 100 <= max_cost_points)
    ]
    if eligible.empty:
        return None
    return str(eligible.sort_values(["adoption_reduction", "capability_cost"], ascending=[False, True]).iloc[0].setting)


def sweep_table(
    responses: pd.DataFrame, settings: list[str], n_boot: int, confidence: float, max_cost_points: float, seed: int = 0
) -> pd.DataFrame:
    """One row per setting (the first is the uncapped baseline) from the evaluation's replies: each estimate
    with its `_low`/`_high` interval, the paired differences from the baseline, the front and the pick."""

    def by_prompt(setting: str, kind: str, column: str) -> pd.Series:
        part = responses[(responses["setting"] == setting) & (responses["kind"] == kind)]
        return part.set_index("id")[column].astype("Float64").astype(float)

    base = settings[0]
    base_adopted = by_prompt(base, "persona", "score") == 3
    base_correct = by_prompt(base, "capability", "correct")
    rows = []
    for setting in settings:
        scores = by_prompt(setting, "persona", "score")
        adopted = (scores == 3).astype(float).where(scores.notna())
        drifted = (scores >= 2).astype(float).where(scores.notna())
        correct = by_prompt(setting, "capability", "correct")
        fired = responses.loc[responses["setting"] == setting, "fired"].astype(float)
        row = {"setting": setting, "n_persona": int(scores.notna().sum()), "n_capability": int(correct.notna().sum())}
        estimates = {
            "persona_adoption": adopted,
            "persona_drift": drifted,
            "persona_score": scores,
            "accuracy": correct,
            "projection_persona": by_prompt(setting, "persona", "projection"),
            "projection_capability": by_prompt(setting, "capability", "projection"),
            "fired": fired,
        }
        for name, values in estimates.items():
            row[name] = float(np.nanmean(values)) if values.notna().any() else float("nan")
            row[f"{name}_low"], row[f"{name}_high"] = bootstrap_ci(values, n_boot, confidence, seed)
        # Paired over the same prompts: positive = fewer replies fully in the persona / fewer correct answers.
        reduction = paired_ci(base_adopted.astype(float), adopted.reindex(base_adopted.index), n_boot, confidence, seed)
        cost = paired_ci(base_correct, correct.reindex(base_correct.index), n_boot, confidence, seed)
        row["adoption_reduction"], row["adoption_reduction_low"], row["adoption_reduction_high"] = reduction
        row["capability_cost"], row["capability_cost_low"], row["capability_cost_high"] = cost
        rows.append(row)
    table = pd.DataFrame(rows)
    table["pareto"] = pareto_front(table["capability_cost"], table["adoption_reduction"])
    pick = recommend(table, max_cost_points)
    table["recommended"] = table["setting"] == pick
    return table
