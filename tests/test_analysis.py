"""The stages after the axis: pca, stability, calibrate, evaluate, and the Snakemake report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from assistant_axis.analysis import pca, split_cosines, subset_sizes
from assistant_axis.axis import load_axis
from assistant_axis.cap import layer_range, percentile_thresholds
from assistant_axis.errors import InputError
from assistant_axis.evaluate import first_of_each_category, load_eval_prompts
from assistant_axis.interop import load_capping

from workflow_helpers import ROOT, snakemake

MODEL = "smollm2-135m-instruct"


def test_pca_aligns_pc1_with_the_axis_and_reports_variance():
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(64, generator=generator)
    # Roles spread mostly along one direction, a little along others.
    vectors = torch.randn(10, 1, generator=generator) * 5 * direction + 0.1 * torch.randn(10, 64, generator=generator)
    for sign in (1, -1):
        result = pca(vectors, sign * direction)
        cos = float(torch.nn.functional.cosine_similarity(result.components[0], sign * direction, dim=0))
        assert cos > 0.99
    assert result.variance_ratio[0] > 0.9
    assert float(result.variance_ratio.sum()) == pytest.approx(1.0, abs=1e-5)
    assert len(result.variance_ratio) == 9  # 10 centred vectors span at most 9 directions


def test_split_cosines_use_disjoint_subsets_of_every_fitting_size():
    assert subset_sizes(20, [4, 8, 16, 32]) == [4, 8, 10]
    acts = torch.randn(20, 8)
    rows = split_cosines(acts, torch.zeros(8), [4, 8], repeats=3, generator=torch.Generator().manual_seed(1))
    assert [(n, r) for n, r, _, _ in rows] == [(n, r) for n in (4, 8, 10) for r in range(3)]
    # With the reference at zero both cosines are the same quantity.
    assert all(c == pytest.approx(raw) for _, _, c, raw in rows)


def test_percentile_thresholds_match_numpy_and_layer_ranges():
    x = torch.randn(101, 4)
    ours = percentile_thresholds(x, [1, 25, 50])
    assert np.allclose(ours.numpy(), np.percentile(x.numpy(), [1, 25, 50], axis=0), atol=1e-5)
    assert layer_range([0.5, 0.6], 30) == [15, 16, 17]
    with pytest.raises(InputError, match="^layer_range: fractions: .* selects no layers of 30"):
        layer_range([0.9, 0.91], 30)


def test_evaluation_prompts_load_and_bad_rows_are_named(tmp_path):
    prompts = load_eval_prompts(ROOT / "data/evaluation/prompts.jsonl")
    categories = {p.category for p in prompts}
    assert len(categories) == 3 and all(p.persona and p.description for p in prompts)
    kept = first_of_each_category(prompts, 2)
    assert len(kept) == 6 and {p.category for p in kept} == categories
    assert kept == [p for p in prompts if p in kept]  # file order kept
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"id": "x", "category": "meta", "prompt": "Who are you?", "persona": "ghost"}) + "\n")
    with pytest.raises(InputError, match=r"prompts.jsonl:1: description: missing or empty"):
        load_eval_prompts(bad)


@pytest.mark.slow
def test_pipeline_writes_pca_stability_capping_and_evaluation(tiny_run):
    results = tiny_run / "results" / MODEL
    axis, layers, _ = load_axis(results / "axis.safetensors")
    summary = pd.read_parquet(results / "pca/summary.parquet")
    assert summary["layer"].tolist() == layers
    assert summary["pc1_cosine"].between(0, 1).all()  # sign-aligned with the axis
    roles = pd.read_parquet(results / "pca/roles.parquet")
    assert sorted(roles["role"]) == ["accountant", "ghost", "pirate"]
    stability = pd.read_parquet(results / "stability/roles.parquet")
    assert stability["cosine"].between(-1, 1).all() and set(stability["n"]) <= {1, 2}
    percentiles = pd.read_parquet(results / "capping/percentiles.parquet")
    config = load_capping(results / "capping/late-p25.safetensors", model_name=MODEL, hidden_size=576)
    assert config.layers == layer_range([0.70, 0.85], 30)
    expected = percentiles.set_index("layer").loc[config.layers, "p25"].to_numpy()
    assert np.allclose(config.thresholds.numpy(), expected)
    evaluation = pd.read_parquet(results / "evaluation/summary.parquet")
    assert evaluation["setting"].tolist() == ["uncapped", "late-p25"]
    replies = pd.read_parquet(results / "evaluation/responses.parquet")
    capped = replies[replies["setting"] == "late-p25"]
    # Every token is held at or above its layer's floor, so every reply's mean over the capped layers is too.
    floor = float(config.thresholds.mean())
    assert (capped["projection_capped_layers"] >= floor - 1e-4 * abs(floor)).all()
    import matplotlib.image

    for name in (
        "pca/variance.png",
        "pca/scatter.png",
        "pca/layers.png",
        "stability/rollouts.png",
        "capping/thresholds.png",
        "evaluation/sweep.png",
        "drift/drift.png",
    ):
        pixels = matplotlib.image.imread(results / name)  # a real PNG with something drawn on it
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels[..., :3].std() > 0.05, name


@pytest.mark.slow
def test_pca_and_evaluation_tables_equal_independent_recomputations(tiny_run):
    """The PCA summary from numpy's eigendecomposition of the role vectors; the evaluation summary from
    responses.parquet by plain pandas."""
    from safetensors.torch import load_file

    results = tiny_run / "results" / MODEL
    axis, layers, _ = load_axis(results / "axis.safetensors")
    used = pd.read_parquet(results / "vectors/summary.parquet").query("included and role != 'default'")["role"]
    vectors = np.stack([load_file(results / f"vectors/{r}.safetensors")["vector"].double().numpy() for r in used])
    summary = pd.read_parquet(results / "pca/summary.parquet").set_index("layer")
    for row, layer in enumerate(layers):
        centred = vectors[:, row] - vectors[:, row].mean(axis=0)
        values, directions = np.linalg.eigh(centred.T @ centred)  # ascending
        top, a = directions[:, -1], axis[layer].double().numpy()
        assert summary.loc[layer, "pc1_variance"] == pytest.approx(values[-1] / values.sum(), abs=1e-4)
        assert summary.loc[layer, "pc1_cosine"] == pytest.approx(abs(top @ a) / np.linalg.norm(a), abs=1e-4)
        assert summary.loc[layer, "axis_norm"] == pytest.approx(np.linalg.norm(a), rel=1e-5)
    replies = pd.read_parquet(results / "evaluation/responses.parquet")
    evaluation = pd.read_parquet(results / "evaluation/summary.parquet").set_index("setting")
    base = replies[replies["setting"] == "uncapped"].set_index("id")
    for setting, part in replies.groupby("setting"):
        persona, capability = part[part["kind"] == "persona"], part[part["kind"] == "capability"]
        scored = persona["score"].dropna()
        correct = capability["correct"].astype(float)
        assert evaluation.loc[setting, "persona_adoption"] == pytest.approx((scored == 3).mean() if len(scored) else 0)
        assert evaluation.loc[setting, "accuracy"] == pytest.approx(correct.mean())
        cost = base.loc[capability["id"], "correct"].astype(float).mean() - correct.mean()
        assert evaluation.loc[setting, "capability_cost"] == pytest.approx(cost, abs=1e-12)
        assert evaluation.loc[setting, "projection_persona"] == pytest.approx(persona["projection"].mean())
        assert evaluation.loc[setting, "n_capability"] == len(capability)
        assert evaluation.loc[setting, "n_persona"] == len(persona)
        for name in ("persona_adoption", "accuracy", "capability_cost", "adoption_reduction"):
            low, high = evaluation.loc[setting, f"{name}_low"], evaluation.loc[setting, f"{name}_high"]
            assert low <= evaluation.loc[setting, name] <= high, (setting, name)
    capped = replies[replies["setting"] == "late-p25"]
    assert capped["fired"].between(0, 1).all() and replies[replies["setting"] == "uncapped"]["fired"].isna().all()


@pytest.mark.slow
def test_report_holds_every_plot_with_its_caption(tiny_run, tmp_path):
    report = tmp_path / "report.html"
    snakemake(tiny_run, "--report", str(report))
    html = report.read_text(errors="replace")
    for needle in (
        "variance.png",
        "scatter.png",
        "layers.png",
        "rollouts.png",
        "thresholds.png",
        "sweep.png",
        "pareto.html",
        "drift.png",
        "Pareto front",
        "Drift over a conversation",
        "disjoint random subsets",
        "Assistant Axis",
    ):
        assert needle in html, needle
