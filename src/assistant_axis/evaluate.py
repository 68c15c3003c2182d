"""Does capping stop persona drift, and what does it cost?

Two prompt sets, answered by every setting (uncapped, then every capping config of the sweep):
- persona prompts (`data/evaluation/prompts.jsonl`): role-play jailbreak framings, "true self" meta-questions
  and emotionally loaded turns, each naming the character it pushes towards; the judge scores how fully a
  reply adopts it (0-3);
- capability prompts (`data/evaluation/capability.jsonl`, see `capability`): arithmetic, facts and
  instructions with checkable constraints, each reply checked automatically.
One row per setting and prompt, with its projections and the share of its tokens where the cap fired;
`sweep.sweep_table` turns the rows into estimates with intervals, the Pareto front and the recommendation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from assistant_axis.artifacts import read_jsonl
from assistant_axis.capability import CapabilityItem, passes
from assistant_axis.errors import InputError
from assistant_axis.judge import JudgeItem

__all__ = [
    "EvalPrompt",
    "load_eval_prompts",
    "first_of_each_category",
    "answer_every_setting",
    "watched_layers",
    "UNCAPPED",
]

log = logging.getLogger(__name__)

UNCAPPED = "uncapped"
PERSONA_FIELDS = ("id", "category", "prompt", "persona", "description")


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    category: str
    prompt: str
    persona: str
    description: str


def load_eval_prompts(path: str | Path) -> list[EvalPrompt]:
    """Read and check the persona prompts: one line, one JSON object, every field a string, unique ids."""
    prompts = [EvalPrompt(*(row[name] for name in PERSONA_FIELDS)) for _, row in read_jsonl(path, PERSONA_FIELDS)]
    if not prompts:
        raise InputError(path, "prompt", "no persona prompts to evaluate")
    return prompts


def first_of_each_category(items: list, n: int | None) -> list:
    """The first `n` items of each category, in file order (`None`: all): a small run still covers them all."""
    if not n:
        return items
    counts: dict[str, int] = {}
    kept = []
    for item in items:
        counts[item.category] = counts.get(item.category, 0) + 1
        if counts[item.category] <= n:
            kept.append(item)
    return kept


def answer_every_setting(
    session,
    persona: list[EvalPrompt],
    capability: list[CapabilityItem],
    layer: int,
    sampling,
    judge,
) -> pd.DataFrame:
    """Every prompt answered uncapped and then under each capping config of `session` (an engine's session
    whose settings are "none" and the sweep's configs, its layers `layer` and every capped layer): one row
    per setting and prompt with the reply, its judge score (persona prompts) or check (capability ones),
    its projection on the unit axis at `layer` and over the capped layers, read under the same cap, as the
    model sees them, and the share of its (token, capped layer) pairs where the cap fired. All settings'
    replies are asked for at once (an engine that batches them shares its batches)."""
    prompts = [*persona, *capability]
    conversations = [session.template.conversation("", p.prompt) for p in prompts]
    names = {UNCAPPED: "none", **{setting: setting for setting in session.cappings}}
    answered = session.answer({name: conversations for name in names.values()}, sampling)
    cap_layers, _ = watched_layers(session.cappings, layer)
    frames = []
    for setting, name in names.items():
        replies = answered[name]
        projections = torch.tensor(
            [[float("nan") if v is None else v for v in r.projection] for r in replies], dtype=torch.float32
        )
        fired = [float("nan") if r.fired_share is None else r.fired_share for r in replies]
        texts, n_tokens = [r.text for r in replies], [len(r.token_ids) for r in replies]
        frames.append(
            _setting_frame(
                setting,
                persona,
                capability,
                texts,
                n_tokens,
                projections,
                fired,
                session.layers,
                layer,
                cap_layers,
                judge,
            )  # fmt: skip
        )
        log.info("setting %s done", setting)
    return pd.concat(frames, ignore_index=True)


def watched_layers(configs: dict, layer: int) -> tuple[list[int], list[int]]:
    """(the capped layers, the layers whose projections the evaluation reads)."""
    cap_layers = sorted({layer for c in configs.values() for layer in c.layers})
    return cap_layers, sorted({layer, *cap_layers})


def _setting_frame(
    setting: str,
    persona: list[EvalPrompt],
    capability: list[CapabilityItem],
    texts: list[str],
    n_tokens: list[int],
    projections: torch.Tensor,
    fired: list[float],
    watched: list[int],
    layer: int,
    cap_layers: list[int],
    judge,
) -> pd.DataFrame:
    """One setting's rows (persona prompts, then capability ones): each reply judged or checked, its projections."""

    items = [JudgeItem(p.persona, p.description, p.prompt, t) for p, t in zip(persona, texts, strict=False)]
    scores = [s.score for s in judge.score(items)] + [None] * len(capability)
    checks = [None] * len(persona) + [
        passes(t, c.checks) for c, t in zip(capability, texts[len(persona) :], strict=True)
    ]
    prompts = [*persona, *capability]
    on_caps = projections[:, [watched.index(c) for c in cap_layers]].mean(dim=1) if cap_layers else None
    return pd.DataFrame(
        {
            "setting": setting,
            "id": [p.id for p in prompts],
            "kind": ["persona"] * len(persona) + ["capability"] * len(capability),
            "category": [p.category for p in prompts],
            "prompt": [p.prompt for p in prompts],
            "response": texts,
            "n_response_tokens": n_tokens,
            "score": pd.array(scores, dtype="Int64"),
            "correct": pd.array(checks, dtype="boolean"),
            "projection": projections[:, watched.index(layer)].numpy(),
            "projection_capped_layers": on_caps.numpy() if on_caps is not None else float("nan"),
            "fired": fired,
            "judge": judge.name,
        }
    )
