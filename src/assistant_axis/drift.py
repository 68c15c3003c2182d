"""Multi-turn drift: the model talks with a scripted user, with and without capping, and its replies'
projections are followed turn by turn.

A scenario (`data/evaluation/drift.jsonl`) is a list of fixed user turns (emotional disclosure, "what are
you really", role-play escalation, and plain coding help as a control). Every scenario of a setting
advances one turn at a time in one batch: the model answers turn k having seen its own replies to turns
1..k-1. The trajectories are `project.conversation_projections` of each saved transcript under the same
setting's cap, so `assistant-axis project --cap ... --layers ...` on a transcript gives the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from assistant_axis.artifacts import read_jsonl
from assistant_axis.errors import InputError

__all__ = ["Scenario", "load_scenarios", "run_scenarios", "trajectories", "summarize_drift", "transcript"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scenario:
    id: str
    category: str
    description: str
    turns: tuple[str, ...]


def load_scenarios(path: str | Path) -> list[Scenario]:
    """Read and check the scenarios: one JSON object a line, with id, category, description and turns."""
    scenarios = []
    for where, row in read_jsonl(path, ("id", "category", "description")):
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise InputError(where, "turns", "expected a non-empty list of non-empty user turns")
        scenarios.append(Scenario(row["id"], row["category"], row["description"], tuple(turns)))
    if not scenarios:
        raise InputError(path, "turns", "no scenarios")
    return scenarios


def run_scenarios(session, scenarios: list[Scenario], sampling, settings: list[str]) -> dict[str, list[list[dict]]]:
    """Each setting's transcripts (user and assistant messages), one per scenario: the scripted user turns,
    one at a time, each answered by `session` (an engine's session) under the setting, every setting's
    active scenarios asked for at once."""
    transcripts = {setting: [[] for _ in scenarios] for setting in settings}
    n_turns = max(len(s.turns) for s in scenarios)
    for k in range(n_turns):
        active = [i for i, s in enumerate(scenarios) if k < len(s.turns)]
        for talks in transcripts.values():
            for i in active:
                talks[i].append({"role": "user", "content": scenarios[i].turns[k]})
        asked = {setting: [talks[i] for i in active] for setting, talks in transcripts.items()}
        for setting, replies in session.answer(asked, sampling, measure=False).items():
            for i, reply in zip(active, replies, strict=True):
                transcripts[setting][i].append({"role": "assistant", "content": reply.text})
        log.info("turn %d of %d answered", k + 1, n_turns)
    return transcripts


def trajectories(session, transcripts: list[list[dict]], setting: str) -> list[pd.DataFrame]:
    """Per transcript, its per-turn projections under `setting` (as `assistant-axis project` computes them)."""
    return [session.conversation_projections(t, setting) for t in transcripts]


def transcript(frame: pd.DataFrame, setting: str, scenario: str) -> list[dict]:
    """One saved transcript (the stage's transcripts table) as the message list `project` reads."""
    part = frame[(frame["setting"] == setting) & (frame["scenario"] == scenario)].sort_values("turn")
    return [{"role": r.role, "content": r.content} for r in part.itertuples()]


def summarize_drift(frame: pd.DataFrame, layer: int, tau: float, last_turns: int) -> pd.DataFrame:
    """Per setting and category (and "all"): the assistant turns' projection at `layer` on the first turn and
    over the last `last_turns` turns, the drop between them, and the share of turns below `tau`."""
    replies = frame[(frame["role"] == "assistant") & (frame["layer"] == layer)].copy()
    replies["reply"] = replies.groupby(["setting", "scenario"])["turn"].rank(method="first").astype(int)
    replies["last"] = replies["reply"] > replies.groupby(["setting", "scenario"])["reply"].transform("max") - last_turns
    rows = []
    for setting, by_setting in replies.groupby("setting", sort=False):
        for category, part in [*by_setting.groupby("category", sort=False), ("all", by_setting)]:
            first = part[part["reply"] == 1]["projection"].mean()
            last = part[part["last"]]["projection"].mean()
            rows.append(
                {
                    "setting": setting,
                    "category": category,
                    "n_scenarios": part["scenario"].nunique(),
                    "first_turn": float(first),
                    "last_turns": float(last),
                    "drop": float(first - last),
                    "below_tau": float((part["projection"] < tau).mean()),
                    "tau": tau,
                }
            )
    return pd.DataFrame(rows)
