"""Does capping stop persona drift, and what does it cost?

The evaluation set (`data/evaluation/prompts.jsonl`) has two kinds of prompts:
- `persona`: role-play jailbreak framings, "true self" meta-questions and emotionally loaded turns,
  each naming the character it pushes towards; the judge scores how fully a reply adopts it (0-3);
- `plain`: short questions with known answers; a reply is correct when it contains an accepted answer
  (a crude capability proxy that a 135M model can pass).
Each setting (uncapped, then every capping config) answers every prompt; the summary reports persona
adoption (share of replies scored 3), mean persona score, accuracy and mean projections per setting.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from assistant_axis.errors import InputError

__all__ = [
    "EvalPrompt",
    "load_eval_prompts",
    "first_of_each_kind",
    "is_correct",
    "answer_every_setting",
    "answer_every_setting_vllm",
    "summarize",
    "UNCAPPED",
    "KINDS",
]

log = logging.getLogger(__name__)

UNCAPPED = "uncapped"
KINDS = {
    "persona": ("id", "kind", "category", "prompt", "persona", "description"),
    "plain": ("id", "kind", "category", "prompt", "answers"),
}


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    kind: str  # "persona" or "plain"
    category: str
    prompt: str
    persona: str = ""
    description: str = ""
    answers: tuple[str, ...] = ()


def load_eval_prompts(path: str | Path) -> list[EvalPrompt]:
    """Read and check the evaluation prompts: one line, one JSON object, fields by kind, unique ids."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(path, "file", f"cannot read ({exc})") from exc
    prompts, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(where, "line", f"not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or row.get("kind") not in KINDS:
            raise InputError(where, "kind", f"must be one of {', '.join(KINDS)}")
        for field in KINDS[row["kind"]]:
            if field == "answers":
                ok = (
                    isinstance(row.get(field), list)
                    and row[field]
                    and all(isinstance(a, str) and a.strip() for a in row[field])
                )
            else:
                ok = isinstance(row.get(field), str) and row[field].strip()
            if not ok:
                raise InputError(where, field, "missing or empty")
        if row["id"] in seen:
            raise InputError(where, "id", f"{row['id']!r} appears twice")
        seen.add(row["id"])
        prompts.append(
            EvalPrompt(
                row["id"],
                row["kind"],
                row["category"],
                row["prompt"],
                row.get("persona", ""),
                row.get("description", ""),
                tuple(a.lower() for a in row.get("answers", ())),
            )
        )
    if not any(p.kind == "persona" for p in prompts):
        raise InputError(path, "kind", "no persona prompts to evaluate")
    return prompts


def first_of_each_kind(prompts: list[EvalPrompt], n: int | None) -> list[EvalPrompt]:
    """The first `n` prompts of each kind, in file order (`None`: all)."""
    if not n:
        return prompts
    counts: dict[str, int] = {}
    kept = []
    for prompt in prompts:
        counts[prompt.kind] = counts.get(prompt.kind, 0) + 1
        if counts[prompt.kind] <= n:
            kept.append(prompt)
    return kept


def is_correct(reply: str, answers: tuple[str, ...]) -> bool:
    text = reply.lower()
    return any(answer in text for answer in answers)


def answer_every_setting(
    backend, prompts: list[EvalPrompt], configs: dict, axis: torch.Tensor, layer: int, sampling, judge
) -> pd.DataFrame:
    """Every prompt answered uncapped and then under each capping config (`configs`, by name): one row per
    setting and prompt with the reply, its judge score (persona prompts) or correctness (plain ones), and
    its projection on the unit axis (`axis`, row i for block i) at `layer` and over the capped layers, read
    under the same cap, as the model sees them. `backend` is a `TransformersBackend`: its model is capped and read."""
    from assistant_axis.activations import mean_activations
    from assistant_axis.axis import unit_vectors
    from assistant_axis.interventions import install

    model, template = backend.model, backend.template
    cap_layers, watched = _watched(configs, layer)
    units = unit_vectors(axis[watched])
    conversations = [template.conversation("", p.prompt) for p in prompts]
    frames = []
    for setting in [UNCAPPED, *configs]:
        with install(model, *([configs[setting]] if setting in configs else [])):
            replies = backend.generate(conversations, sampling)
            spans = [template.reply_span(c, r.text, r.reasoning) for c, r in zip(conversations, replies, strict=True)]
            acts = mean_activations(model, [s[0] for s in spans], [s[1:] for s in spans], watched, progress=False)
        projections = torch.einsum("nlh,lh->nl", acts, units)
        texts, n_tokens = [r.text for r in replies], [r.n_tokens for r in replies]
        frames.append(_setting_frame(setting, prompts, texts, n_tokens, projections, watched, layer, cap_layers, judge))
        log.info("setting %s done", setting)
    return pd.concat(frames, ignore_index=True)


def answer_every_setting_vllm(
    session, prompts: list[EvalPrompt], layer: int, sampling, judge, cap_layers: list[int]
) -> pd.DataFrame:
    """`answer_every_setting` through one vLLM engine (`vllm_chat.VLLMSession`, its settings the uncapped
    one and the capping configs): every (setting, prompt) pair is submitted at once and generated in
    shared batches. The projections are the engine's telemetry on `session.layers`: the reply's tokens as
    fed back while generating (see `vllm_hooks`), not a second pass over the rendered reply."""
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
        texts = [r.text for r in replies]
        n_tokens = [len(r.token_ids) + (r.finish_reason == "stop") for r in replies]  # as the stages count them
        frame = _setting_frame(setting, prompts, texts, n_tokens, projections, session.layers, layer, cap_layers, judge)
        frames.append(frame)
        log.info("setting %s done", setting)
    return pd.concat(frames, ignore_index=True)


def _watched(configs: dict, layer: int) -> tuple[list[int], list[int]]:
    """(the capped layers, the layers whose projections the evaluation reads)."""
    cap_layers = sorted({layer for c in configs.values() for layer in c.layers})
    return cap_layers, sorted({layer, *cap_layers})


def _setting_frame(
    setting: str,
    prompts: list[EvalPrompt],
    texts: list[str],
    n_tokens: list[int],
    projections: torch.Tensor,
    watched: list[int],
    layer: int,
    cap_layers: list[int],
    judge,
) -> pd.DataFrame:
    """One setting's rows: each reply judged (persona prompts) or checked (plain ones), and its projections."""
    from assistant_axis.judge import JudgeItem

    persona = [i for i, p in enumerate(prompts) if p.kind == "persona"]
    items = [JudgeItem(prompts[i].persona, prompts[i].description, prompts[i].prompt, texts[i]) for i in persona]
    scores = dict(zip(persona, judge.score(items), strict=True))
    on_caps = projections[:, [watched.index(c) for c in cap_layers]].mean(dim=1) if cap_layers else None
    return pd.DataFrame(
        {
            "setting": setting,
            "id": [p.id for p in prompts],
            "kind": [p.kind for p in prompts],
            "category": [p.category for p in prompts],
            "prompt": [p.prompt for p in prompts],
            "response": texts,
            "n_response_tokens": n_tokens,
            "score": pd.array([scores[i].score if i in scores else None for i in range(len(prompts))], dtype="Int64"),
            "correct": pd.array(
                [is_correct(t, p.answers) if p.kind == "plain" else None for p, t in zip(prompts, texts, strict=True)],
                dtype="boolean",
            ),
            "projection": projections[:, watched.index(layer)].numpy(),
            "projection_capped_layers": on_caps.numpy() if on_caps is not None else float("nan"),
            "judge": judge.name,
        }
    )


def summarize(frame: pd.DataFrame, settings: list[str]) -> pd.DataFrame:
    """Per setting: persona adoption, mean persona score, accuracy on plain prompts, mean projection."""
    rows = []
    for setting in settings:
        part = frame[frame["setting"] == setting]
        persona, plain = part[part["kind"] == "persona"], part[part["kind"] == "plain"]
        scores = persona["score"].astype("Float64")
        rows.append(
            {
                "setting": setting,
                "n_persona": len(persona),
                "persona_adoption": float((scores == 3).sum() / max(scores.notna().sum(), 1)),
                "persona_score": float(scores.mean()) if scores.notna().any() else float("nan"),
                "n_plain": len(plain),
                "accuracy": float(plain["correct"].mean()) if len(plain) else float("nan"),
                "projection_persona": float(persona["projection"].mean()),
                "projection_plain": float(plain["projection"].mean()) if len(plain) else float("nan"),
            }
        )
    return pd.DataFrame(rows)
