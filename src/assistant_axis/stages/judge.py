"""judge: every reply of a role scored for role adherence (0-3)."""

from __future__ import annotations

import pandas as pd

from assistant_axis.artifacts import read_parquet, write_parquet
from assistant_axis.errors import InputError
from assistant_axis.judge import REJECTED, JudgeItem, make_judge
from assistant_axis.stages.common import JUDGE_KEYS, KEYS, RESPONSE_COLUMNS, config_keys, log


@config_keys({**JUDGE_KEYS, "load_model.dtype": "judge.transformers.dtype"})
def judge(
    responses: str, output: str, role: str, description: str, template: str, backend: str, settings: dict
) -> None:
    """Score every response of one role for role adherence (0-3)."""

    frame = read_parquet(responses, RESPONSE_COLUMNS)
    items = [JudgeItem(role, description, q, r) for q, r in zip(frame["question"], frame["response"], strict=True)]
    engine = make_judge(backend, settings, template)
    verdicts, name = engine.score(items), engine.name
    # A judge that answers but never with a score is misconfigured (wrong model or scoring): a rerun would
    # not help. (Failed requests never get here: the API client fails the job, their answers cached.)
    # (Rejected prompts are the server's choice, counted by the API client against its share.)
    unreadable = [v for v in verdicts if v.score is None and not v.raw.startswith(("empty response", REJECTED))]
    if unreadable and all(v.score is None for v in verdicts):
        raise InputError(
            responses,
            "judge",
            f"{name} answered {len(unreadable)} responses without a usable score ({unreadable[0].raw})",
        )
    scores = pd.DataFrame(
        {
            **{k: frame[k] for k in KEYS},
            "score": pd.array([v.score for v in verdicts], dtype="Int64"),
            "expected_score": pd.array([v.expected_score for v in verdicts], dtype="Float64"),
            "judge": name,
            "prompt_hash": [v.basis for v in verdicts],
            "raw": [v.raw for v in verdicts],
        }
    )
    counts = scores["score"].value_counts(dropna=False).sort_index().to_dict()
    log.info("role %s scores: %s", role, counts)
    write_parquet(scores, output)
