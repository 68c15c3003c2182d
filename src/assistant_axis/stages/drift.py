"""drift: scripted multi-turn conversations, uncapped and capped, followed turn by turn."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import torch

from assistant_axis import drift as conversations
from assistant_axis import plots as figures
from assistant_axis.artifacts import read_tensors, write_html_table, write_parquet
from assistant_axis.axis import unit_vectors
from assistant_axis.engines import Sampling
from assistant_axis.errors import InputError
from assistant_axis.evaluate import UNCAPPED, first_of_each_category
from assistant_axis.stages.common import (
    MODEL_KEYS,
    axis_and_layer,
    check_rendering,
    config_keys,
    evaluation_session,
    log,
    model_info,
    sweep_configs,
)


@config_keys(MODEL_KEYS)
def drift(
    model: str,
    axis_file: str,
    capping_files: list[str],
    default_activations: str,
    scenarios_file: str,
    n_scenarios: int | None,
    max_turns: int | None,
    settings: list[str] | None,
    sampling: dict,
    batch_size: int,
    layer: int | None,
    percentile: float,
    last_turns: int,
    transcripts: str,
    trajectories: str,
    summary: str,
    plot: str,
    table: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    template_options: dict | None = None,
    backend: str = "transformers",
    vllm: dict | None = None,
) -> None:
    """The scripted multi-turn scenarios, uncapped and under each capping config in `settings` (None: all):
    transcripts, per-turn projections (as `assistant-axis project` computes them), and how far each setting
    lets the Assistant drift (`tau`: the `percentile` of the default replies' projections at `layer`). In
    the evaluate stage's engine (`backend`, `vllm` its settings there)."""

    axis_tensor, layers, layer, meta = axis_and_layer(axis_file, layer)
    check_rendering(meta, axis_file, template_options, "drift stage")
    info = model_info(model)
    configs = sweep_configs(capping_files, info)
    chosen = list(configs) if settings is None else [s for s in settings if s != UNCAPPED]
    unknown = [s for s in chosen if s not in configs]
    if unknown:
        raise InputError(
            "config",
            "evaluate.drift.settings",
            f"unknown setting {unknown[0]!r} (known: {', '.join([UNCAPPED, *configs])})",
        )
    scenarios = first_of_each_category(conversations.load_scenarios(scenarios_file), n_scenarios)
    scenarios = [replace(s, turns=s.turns[:max_turns]) for s in scenarios]
    acts, act_meta = read_tensors(default_activations, ["activations", "layers"])
    if acts["layers"].tolist() != layers:
        raise InputError(default_activations, "layers", "activation layers differ from the axis's: rerun the axis")
    unit = unit_vectors(axis_tensor[layer : layer + 1])[0]
    default_projections = acts["activations"][:, layers.index(layer)].float() @ unit
    default_projections = default_projections[torch.isfinite(default_projections)]
    tau = float(torch.quantile(default_projections, percentile / 100))
    reply_sampling = Sampling(sampling["temperature"], sampling["top_p"], sampling["max_tokens"], sampling["seed"])
    section = {"batch_size": batch_size, "seed": sampling["seed"], "vllm": vllm or {}}
    engine, session = evaluation_session(
        info, axis_tensor, layers, {name: configs[name] for name in chosen}, layer, backend, section, "evaluate",
        dtype, trust_remote_code, template_options,
    )  # fmt: skip
    names = {UNCAPPED: "none", **{name: name for name in chosen}}
    said, projected = [], []
    try:
        log.info("drift: %d scenarios under %s in %s", len(scenarios), ", ".join(names), backend)
        talks = conversations.run_scenarios(session, scenarios, reply_sampling, list(names.values()))
        for setting, name in names.items():
            frames = conversations.trajectories(session, talks[name], name)
            for scenario, talk, frame in zip(scenarios, talks[name], frames, strict=True):
                said += [
                    {"setting": setting, "scenario": scenario.id, "category": scenario.category, "turn": i, **m}
                    for i, m in enumerate(talk)
                ]
                projected.append(frame.assign(setting=setting, scenario=scenario.id, category=scenario.category))
    finally:
        session.close()
        engine.close()
    spoken, paths = pd.DataFrame(said), pd.concat(projected, ignore_index=True)
    paths = paths[["setting", "scenario", "category", "turn", "role", "layer", "projection", "n_chars"]]
    result = conversations.summarize_drift(paths, layer, tau, last_turns)
    log.info(
        "drift (layer %d, tau %.3g = p%g of the default replies):\n%s",
        layer,
        tau,
        percentile,
        result.to_string(index=False),
    )
    write_parquet(spoken, transcripts)
    write_parquet(paths, trajectories)
    write_parquet(result, summary)
    figures.drift(paths, layer, tau, plot)
    write_html_table(
        result,
        table,
        f"Assistant turns' projection at layer {layer}: first turn, mean of the last {last_turns}, the drop "
        f"between them, and the share of turns below tau = {tau:.3g} (p{percentile:g} of the default replies).",
    )
