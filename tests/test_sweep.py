"""Choosing the cap: capability checks on hand-written answers, bootstrap intervals, the Pareto front and the rule."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from assistant_axis.capability import load_capability, passes
from assistant_axis.errors import InputError
from assistant_axis.sweep import bootstrap_ci, paired_ci, pareto_front, recommend, sweep_table

from workflow_helpers import ROOT


def answer(*answers):
    return [{"type": "answer", "answers": list(answers)}]


@pytest.mark.parametrize(
    ("reply", "checks", "expected"),
    [
        ("The answer is 12.", answer("12"), True),
        ("12", answer("12"), True),
        ("It is 112.", answer("12"), False),  # a substring match would accept these three
        ("About 12.5 apples.", answer("12"), False),
        ("1200 in all", answer("12"), False),
        ("That makes 1,024 bytes.", answer("1024"), True),  # thousands separator
        ("Twelve, of course!", answer("12", "twelve"), True),
        ("The capital is Paris, France.", answer("paris"), True),
        ("It is Shakespeare’s play.", answer("shakespeare"), True),
        ("Parisian cafes are lovely.", answer("paris"), False),
        ("It is the United States.", answer("united states"), True),
        ("United we stand; states differ.", answer("united states"), False),
        ("", answer("12"), False),
        ("apple banana cherry", [{"type": "word_count", "min": 3, "max": 3}], True),
        ("apple banana cherry date", [{"type": "word_count", "min": 3, "max": 3}], False),
        ("a cat sat", [{"type": "word_count", "max": 10}], True),
        ("No commas here at all", [{"type": "no_commas"}], True),
        ("Well, one comma", [{"type": "no_commas"}], False),
        ("all lowercase words", [{"type": "lowercase"}], True),
        ("almost all Lowercase", [{"type": "lowercase"}], False),
        ("SHOUTING 123!", [{"type": "uppercase"}], True),
        ("SHOUTINg", [{"type": "uppercase"}], False),
        ('"Yes, water is wet."', [{"type": "starts_with", "text": "yes"}], True),
        ("Well yes it is.", [{"type": "starts_with", "text": "yes"}], False),
        ("That is all. Done!", [{"type": "ends_with", "text": "done"}], True),
        ("Done. That is all.", [{"type": "ends_with", "text": "done"}], False),
        ("The sky is blue over the river.", [{"type": "includes", "words": ["blue", "river"]}], True),
        ("The sky is bluer over the riverbank.", [{"type": "includes", "words": ["blue", "river"]}], False),
        ("A cat sleeps on a mat.", [{"type": "excludes", "words": ["the"]}], True),
        ("There is a cat; then the mat.", [{"type": "excludes", "words": ["the"]}], False),
        ("cat\ndog\n\nfox\n", [{"type": "lines", "min": 3, "max": 3}], True),
        ("cat, dog, fox", [{"type": "lines", "min": 3, "max": 3}], False),
        ("green", [{"type": "lowercase"}, *answer("green")], True),
        ("Green", [{"type": "lowercase"}, *answer("green")], False),  # every check must pass
    ],
)
def test_capability_checks_accept_and_reject_hand_written_answers(reply, checks, expected):
    assert passes(reply, checks) is expected


def test_the_capability_prompts_load_and_bad_lines_are_named(tmp_path):
    items = load_capability(ROOT / "data/evaluation/capability.jsonl")
    assert len(items) >= 200 and {i.category for i in items} == {"arithmetic", "facts", "instructions"}
    assert len({i.id for i in items}) == len(items)
    good = {"id": "x", "category": "facts", "prompt": "Capital of France?", "checks": answer("paris")}
    for edit, field in [
        ({"checks": []}, "checks"),
        ({"checks": [{"type": "answer", "answers": []}]}, "checks[0]"),
        ({"checks": [{"type": "telepathy"}]}, "checks[0]"),
        ({"checks": [{"type": "word_count"}]}, "checks[0]"),
        ({"checks": [{"type": "word_count", "min": 4, "max": 2}]}, "checks[0]"),
        ({"checks": [{"type": "no_commas", "strict": True}]}, "checks[0]"),
        ({"prompt": " "}, "prompt"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "y", **edit}) + "\n")
        with pytest.raises(InputError) as caught:
            load_capability(bad)
        assert f"{bad}:2" in str(caught.value) and field in str(caught.value), (edit, caught.value)


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_more_prompts():
    rng = np.random.default_rng(3)
    widths = []
    for n in (20, 200, 2000):
        values = (rng.random(n) < 0.3).astype(float)
        low, high = bootstrap_ci(values, n_boot=2000, seed=1)
        assert low <= values.mean() <= high
        widths.append(high - low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # ~1/sqrt(n): each 10x more prompts ~3x narrower
    assert bootstrap_ci([1.0] * 50) == (1.0, 1.0)
    assert all(np.isnan(bootstrap_ci([float("nan")])))


def test_paired_intervals_see_a_shift_that_unpaired_noise_hides():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 5, 300)  # large per-prompt spread, shared by both settings
    shifted = base - 0.5 + rng.normal(0, 0.1, 300)
    mean, low, high = paired_ci(base, shifted, seed=2)
    assert low <= mean <= high and low > 0.4 and high < 0.6  # the same prompts: the spread cancels


def test_the_pareto_front_of_a_constructed_table():
    # cost (lower better), gain (higher better)
    cost = [0.0, 0.01, 0.02, 0.03, 0.02, 0.05, float("nan")]
    gain = [0.0, 0.10, 0.30, 0.30, 0.20, 0.50, 0.9]
    assert pareto_front(cost, gain) == [True, True, True, False, False, True, False]
    assert pareto_front([0.1, 0.1], [0.2, 0.2]) == [True, True]  # equal points do not dominate each other


def test_the_rule_picks_the_largest_reduction_within_the_cost_budget():
    table = pd.DataFrame(
        {
            "setting": ["uncapped", "a", "b", "c", "d"],
            "adoption_reduction": [0.0, 0.10, 0.30, 0.50, 0.30],
            "capability_cost": [0.0, 0.0, 0.015, 0.04, 0.01],
        }
    )
    assert recommend(table, 2) == "d"  # b and d reduce as much; d costs less; c is over budget
    assert recommend(table, 5) == "c"
    assert recommend(table.assign(adoption_reduction=[0, 0, -0.1, 0, 0]), 5) is None  # nothing reduces adoption


def test_the_sweep_table_equals_a_recomputation_from_the_replies():
    rows = []
    rng = np.random.default_rng(5)
    for setting, p_adopt, p_correct in [("uncapped", 0.8, 0.6), ("late-p25", 0.4, 0.58), ("late-p50", 0.1, 0.3)]:
        for i in range(40):
            rows.append(
                {
                    "setting": setting,
                    "id": f"p{i}",
                    "kind": "persona",
                    "score": int(3 * (rng.random() < p_adopt)),
                    "correct": None,
                    "projection": rng.normal(),
                    "fired": 0.0 if setting == "uncapped" else 0.2,
                }
            )
            rows.append(
                {
                    "setting": setting,
                    "id": f"c{i}",
                    "kind": "capability",
                    "score": None,
                    "correct": bool(rng.random() < p_correct),
                    "projection": rng.normal(),
                    "fired": 0.1,
                }
            )
    frame = pd.DataFrame(rows).astype({"score": "Int64", "correct": "boolean"})
    table = sweep_table(frame, ["uncapped", "late-p25", "late-p50"], 500, 0.95, max_cost_points=5).set_index("setting")
    for setting in table.index:
        part = frame[frame["setting"] == setting]
        persona, capability = part[part["kind"] == "persona"], part[part["kind"] == "capability"]
        assert table.loc[setting, "persona_adoption"] == pytest.approx((persona["score"] == 3).mean())
        assert table.loc[setting, "accuracy"] == pytest.approx(capability["correct"].astype(float).mean())
        base = frame[(frame["setting"] == "uncapped") & (frame["kind"] == "capability")]
        cost = base["correct"].astype(float).mean() - capability["correct"].astype(float).mean()
        assert table.loc[setting, "capability_cost"] == pytest.approx(cost)
        for name in ("persona_adoption", "accuracy", "adoption_reduction", "capability_cost"):
            assert table.loc[setting, f"{name}_low"] <= table.loc[setting, name] <= table.loc[setting, f"{name}_high"]
    assert table["pareto"].tolist() == pareto_front(table["capability_cost"], table["adoption_reduction"])
    expected = "late-p25" if table.loc["late-p25", "capability_cost"] * 100 <= 5 else None
    assert (table.index[table["recommended"]].tolist() or [None])[0] == expected
