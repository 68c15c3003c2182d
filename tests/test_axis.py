"""Role vectors (filtering by score and count) and the axis arithmetic."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from assistant_axis.axis import compute_axis, project, role_vector
from assistant_axis.errors import InputError


def test_role_vector_uses_only_qualifying_finite_rows():
    acts = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3)
    acts[3] = float("nan")  # an empty reply
    scores = pd.Series([3, 2, 3, 3], dtype="Int64")
    vec = role_vector("bard", acts, scores, min_score=3, min_count=1)
    assert vec.included and vec.n_used == 2 and vec.n_responses == 4
    assert torch.equal(vec.vector, (acts[0] + acts[2]) / 2)


def test_null_scores_never_qualify_and_min_count_excludes():
    acts = torch.randn(3, 2, 4)
    scores = pd.Series([3, None, 1], dtype="Int64")
    vec = role_vector("bard", acts, scores, min_score=3, min_count=2)
    assert not vec.included and vec.n_used == 1
    assert torch.equal(vec.vector, torch.zeros(2, 4))
    lower = role_vector("bard", acts, scores, min_score=1, min_count=2)
    assert lower.included and torch.allclose(lower.vector, (acts[0] + acts[2]) / 2)


def test_default_uses_every_response():
    acts = torch.randn(5, 3, 4)
    vec = role_vector("default", acts, None)
    assert vec.n_used == 5 and torch.allclose(vec.vector, acts.mean(0))


def test_score_count_must_match_rows():
    with pytest.raises(InputError, match="2 scores for 3 activation rows"):
        role_vector("bard", torch.zeros(3, 1, 2), pd.Series([3, 3], dtype="Int64"))


def test_axis_is_default_minus_mean_of_roles():
    default = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    roles = [torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [3.0, 1.0]])]
    assert torch.equal(compute_axis(default, roles), torch.tensor([[0.0, 2.0], [-2.0, -1.0]]))
    with pytest.raises(InputError, match="no role has enough"):
        compute_axis(default, [])


def test_projection_is_on_the_unit_axis():
    axis = torch.tensor([3.0, 4.0])
    assert project(torch.tensor([3.0, 4.0]), axis).item() == pytest.approx(5.0)
    assert project(torch.tensor([[4.0, -3.0]]), axis).tolist() == [pytest.approx(0.0)]
