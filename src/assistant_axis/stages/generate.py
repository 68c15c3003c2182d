"""generate: every role's replies to the questions, one model load and one engine call per job."""

from __future__ import annotations

import pandas as pd

from assistant_axis.artifacts import write_parquet
from assistant_axis.engines import Sampling, open_engine
from assistant_axis.errors import InputError, renamed
from assistant_axis.layers import resolve_layers
from assistant_axis.models import DTYPES
from assistant_axis.roles import stable_seed
from assistant_axis.stages.common import MODEL_KEYS, config_keys, log, model_info, write_activations


@config_keys(MODEL_KEYS)
def generate(
    model: str,
    outputs: list[str],
    jobs: list[dict],
    questions: list[dict],
    backend: str,
    settings: dict,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    template_options: dict | None = None,
    capture: dict | None = None,
    activation_outputs: list[str] | None = None,
) -> None:
    """Every (system prompt x question) pair of each job's role, one model load and one backend call.

    `jobs[i]` is `{"role", "system_prompts"}` and is written to `outputs[i]`. `template_options` are the
    chat template's (`model.chat_template_kwargs`); a thinking model's reasoning goes to its own column.
    `capture` (`{"layers", "dtype"}`, vLLM only) records each reply's mean activations as it is generated,
    written to `activation_outputs[i]` as the activations stage would write them.
    """

    if len(outputs) != len(jobs) or (capture is not None and len(activation_outputs or ()) != len(jobs)):
        raise InputError("workflow", "generate", f"{len(jobs)} roles but {len(outputs)} outputs")
    info = model_info(model)
    recording = None
    if capture is not None:
        if capture["dtype"] not in DTYPES:
            raise InputError("config", "activations.dtype", f"unknown dtype {capture['dtype']!r}")
        with renamed("config", {"resolve_layers.layers": "activations.layers"}):
            recording = (resolve_layers(capture["layers"], info["n_layers"]), DTYPES[capture["dtype"]])
    engine = open_engine(
        backend,
        info["path"],
        settings,
        "generate",
        ["generate", "capture"] if recording else ["generate"],
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        template_options=template_options,
        model_name=info["name"],
        **({"capture": recording} if recording else {}),
    )
    keys, conversations, seeds = [], [], []
    for job in jobs:
        prompts = job["system_prompts"]
        for p in range(len(prompts)):
            for q in range(len(questions)):
                keys.append((job["role"], p, q))
                conversations.append(engine.template.conversation(prompts[p], questions[q]["question"]))
                # A seed per response, from its key: where the backend seeds requests one by one (vLLM,
                # servers), regenerating reproduces unchanged responses whichever job or shard runs them.
                seeds.append(stable_seed(job["role"], prompts[p], questions[q]["id"]) + settings.get("seed", 0))
    sampling = Sampling(
        settings.get("temperature", 0.7),
        settings.get("top_p", 0.9),
        settings.get("max_tokens", 512),
        settings.get("seed", 0) + stable_seed(*sorted(j["role"] for j in jobs)),
    )
    log.info("%d roles, %d responses with %s", len(jobs), len(conversations), backend)
    try:
        replies = engine.generate(conversations, sampling, seeds)
    finally:
        engine.close()
    frames = []
    for job, output in zip(jobs, outputs, strict=True):
        role, prompts = job["role"], job["system_prompts"]
        rows = [(key, reply) for key, reply in zip(keys, replies, strict=True) if key[0] == role]
        frame = pd.DataFrame(
            {
                "role": role,
                "prompt_index": [p for (_, p, _), _ in rows],
                "question_index": [q for (_, _, q), _ in rows],
                "question_id": [questions[q]["id"] for (_, _, q), _ in rows],
                "system_prompt": [prompts[p] for (_, p, _), _ in rows],
                "question": [questions[q]["question"] for (_, _, q), _ in rows],
                "response": [r.text for _, r in rows],
                "n_response_tokens": [r.n_tokens for _, r in rows],
                "finish_reason": [r.finish_reason for _, r in rows],
                "reasoning": [r.reasoning for _, r in rows],
            }
        )
        empty = int((frame["response"].str.strip() == "").sum())
        if empty:
            log.warning("role %s: %d empty responses (kept; they get no activations and no score)", role, empty)
        write_parquet(frame, output)
        frames.append(frame)
    if recording is not None:
        _write_captured(engine, recording[0], capture["dtype"], outputs, frames, activation_outputs, info)


def _write_captured(engine, layer_ids, dtype, outputs, frames, activation_outputs, info) -> None:
    """The activations recorded during generation (`frames`: the responses tables just written to
    `outputs`), written per role as the activations stage writes them; the log counts the replies whose
    mean differs from a separate pass's by design (cut by max_tokens, with reasoning)."""
    write_activations(engine.captured, layer_ids, dtype, outputs, frames, activation_outputs, info, engine.template)
    cut = sum(int((frame["finish_reason"] == "length").sum()) for frame in frames)
    thought = sum(int(frame["reasoning"].fillna("").ne("").sum()) for frame in frames)
    log.info(
        "captured activations at %d layers for %d replies; %d were cut by max_tokens (their last token is "
        "not in the mean), %d have reasoning (in the mean, unlike a separate pass)",
        len(layer_ids),
        sum(len(frame) for frame in frames),
        cut,
        thought,
    )
