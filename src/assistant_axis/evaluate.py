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

__all__ = [
    "EvalPrompt",
    "load_eval_prompts",
    "first_of_each_category",
    "answer_every_setting",
    "answer_every_setting_vllm",
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
    backend,
    persona: list[EvalPrompt],
    capability: list[CapabilityItem],
    configs: dict,
    axis: torch.Tensor,
    layer: int,
    sampling,
    judge,
) -> pd.DataFrame:
    """Every prompt answered uncapped and then under each capping config (`configs`, by name): one row per
    setting and prompt with the reply, its judge score (persona prompts) or check (capability ones), its
    projection on the unit axis (`axis`, row i for block i) at `layer` and over the capped layers, read
    under the same cap, as the model sees them, and the share of its tokens where the cap fired.
    `backend` is a `TransformersBackend`: its model is capped and read."""
    from assistant_axis.activations import mean_activations
    from assistant_axis.axis import unit_vectors
    from assistant_axis.interventions import install

    model, template = backend.model, backend.template
    cap_layers, watched = _watched(configs, layer)
    units = unit_vectors(axis[watched])
    conversations = [template.conversation("", p.prompt) for p in [*persona, *capability]]
    frames = []
    for setting in [UNCAPPED, *configs]:
        config = configs.get(setting)
        with install(model, *([config] if config is not None else [])):
            replies = backend.generate(conversations, sampling)
            spans = [template.reply_span(c, r.text, r.reasoning) for c, r in zip(conversations, replies, strict=True)]
            acts = mean_activations(model, [s[0] for s in spans], [s[1:] for s in spans], watched, progress=False)
            fired = _fired_shares(model, spans, config) if config is not None else [float("nan")] * len(spans)
        projections = torch.einsum("nlh,lh->nl", acts, units)
        texts, n_tokens = [r.text for r in replies], [r.n_tokens for r in replies]
        frames.append(
            _setting_frame(
                setting, persona, capability, texts, n_tokens, projections, fired, watched, layer, cap_layers, judge
            )
        )
        log.info("setting %s done", setting)
    return pd.concat(frames, ignore_index=True)


def _fired_shares(model, spans, config) -> list[float]:
    """Per reply, the share of (token, capped layer) pairs whose projection the cap lifts: the blocks'
    outputs read before the cap's own hooks (under the caps of the layers before)."""
    from assistant_axis.activations import token_projections

    config = config.normalized()
    ranges = [s[1:] for s in spans]
    before = token_projections(
        model, [s[0] for s in spans], ranges, config.layers, config.vectors, progress=False, before_hooks=True
    )
    below = (before < config.thresholds.float()).float()
    shares, offset = [], 0
    for start, end in ranges:
        n = max(end - start, 0)
        shares.append(float(below[offset : offset + n].mean()) if n else float("nan"))
        offset += n
    return shares


def answer_every_setting_vllm(
    session,
    persona: list[EvalPrompt],
    capability: list[CapabilityItem],
    layer: int,
    sampling,
    judge,
    cap_layers: list[int],
) -> pd.DataFrame:
    """`answer_every_setting` through one vLLM engine (`vllm_chat.VLLMSession`, its settings the uncapped
    one and the capping configs): every (setting, prompt) pair is submitted at once and generated in
    shared batches. The projections and firing shares are the engine's telemetry on `session.layers`: the
    reply's tokens as fed back while generating (see `vllm_hooks`), not a second pass over the rendered reply."""
    prompts = [*persona, *capability]
    streams = {
        setting: [session.submit(session.template.conversation("", p.prompt), sampling, setting=name) for p in prompts]
        for setting, name in [(UNCAPPED, "none"), *((s, s) for s in session.cappings)]
    }
    frames = []
    for setting, pending in streams.items():
        replies = [stream.result() for stream in pending]
        projections = torch.tensor(
            [[float("nan") if v is None else v for v in r.projection] for r in replies], dtype=torch.float32
        )
        # As the transformers path counts it: over the setting's own capped layers; none uncapped.
        capped = [session.layers.index(i) for i in session.cappings[setting].layers] if setting != UNCAPPED else []
        fired = [_mean_known([r.fired[i] for i in capped]) if capped else float("nan") for r in replies]
        texts = [r.text for r in replies]
        n_tokens = [len(r.token_ids) + (r.finish_reason == "stop") for r in replies]  # as the stages count them
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
            )
        )
        log.info("setting %s done", setting)
    return pd.concat(frames, ignore_index=True)


def _mean_known(values) -> float:
    known = [v for v in values or () if v is not None]
    return sum(known) / len(known) if known else float("nan")


def _watched(configs: dict, layer: int) -> tuple[list[int], list[int]]:
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
    from assistant_axis.judge import JudgeItem

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
