"""evaluate: the capping sweep's settings answering persona and capability prompts, and the trade-off."""

from __future__ import annotations

import pandas as pd

from assistant_axis import plots as figures
from assistant_axis.artifacts import write_html_table, write_parquet
from assistant_axis.capability import load_capability
from assistant_axis.engines import Sampling
from assistant_axis.evaluate import UNCAPPED, answer_every_setting, first_of_each_category, load_eval_prompts
from assistant_axis.judge import make_judge
from assistant_axis.stages.common import (
    JUDGE_KEYS,
    MODEL_KEYS,
    axis_and_layer,
    check_rendering,
    config_keys,
    evaluation_session,
    log,
    model_info,
    sweep_configs,
)
from assistant_axis.sweep import sweep_table


@config_keys({**MODEL_KEYS, **JUDGE_KEYS})
def evaluate(
    model: str,
    axis_file: str,
    capping_files: list[str],
    prompts_file: str,
    capability_file: str,
    n_prompts: int | None,
    sampling: dict,
    batch_size: int,
    layer: int | None,
    judge: dict,
    sweep: dict,
    responses: str,
    summary: str,
    plot: str,
    pareto: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    template_options: dict | None = None,
    backend: str = "transformers",
    vllm: dict | None = None,
) -> None:
    """Every persona and capability prompt, uncapped and under each capping config of the sweep: replies,
    judge scores, checks, projections, firing; then the sweep's table (estimates with bootstrap intervals,
    Pareto front, the recommended setting by `sweep`'s rule). `backend` "vllm" runs every setting through
    one vLLM engine (`vllm` its settings)."""

    axis_tensor, layers, layer, meta = axis_and_layer(axis_file, layer)
    check_rendering(meta, axis_file, template_options, "evaluation")
    info = model_info(model)
    persona = first_of_each_category(load_eval_prompts(prompts_file), n_prompts)
    capability = first_of_each_category(load_capability(capability_file), n_prompts)
    configs = sweep_configs(capping_files, info)
    scorer = make_judge(judge["backend"], judge["settings"], judge["template"])
    reply_sampling = Sampling(sampling["temperature"], sampling["top_p"], sampling["max_tokens"], sampling["seed"])
    log.info(
        "evaluate: %d persona and %d capability prompts, %d settings in %s",
        len(persona),
        len(capability),
        len(configs) + 1,
        backend,
    )
    section = {"batch_size": batch_size, "seed": sampling["seed"], "vllm": vllm or {}}
    engine, session = evaluation_session(
        info, axis_tensor, layers, configs, layer, backend, section, "evaluate", dtype, trust_remote_code,
        template_options,
    )  # fmt: skip
    try:
        table = answer_every_setting(session, persona, capability, layer, reply_sampling, scorer)
    finally:
        session.close()
        engine.close()
    result = sweep_table(
        table, [UNCAPPED, *configs], sweep["bootstrap"], sweep["confidence"], sweep["max_cost_points"], sampling["seed"]
    )
    result["monitor_layer"] = layer
    shown = [
        "setting",
        "persona_adoption",
        "adoption_reduction",
        "accuracy",
        "capability_cost",
        "fired",
        "pareto",
        "recommended",
    ]
    log.info("evaluation:\n%s", result[shown].to_string(index=False))
    pick = result.loc[result["recommended"], "setting"].tolist()
    log.info(
        "recommended: %s",
        pick[0]
        if pick
        else f"none (no setting reduces adoption within {sweep['max_cost_points']:g} points of capability)",
    )
    write_parquet(table, responses)
    write_parquet(result, summary)
    figures.sweep(result, plot)
    write_html_table(
        _pareto_view(result),
        pareto,
        f"Per setting, with {sweep['confidence']:.0%} bootstrap intervals over prompts ({sweep['bootstrap']} "
        f"resamples). Recommended: the largest adoption reduction whose capability cost is at most "
        f"{sweep['max_cost_points']:g} accuracy points: {pick[0] if pick else 'none meets the rule'}.",
    )


def _pareto_view(result: pd.DataFrame) -> pd.DataFrame:
    """The sweep table as people read it: points, each with its interval."""

    def points(name: str) -> list[str]:
        return [
            f"{v * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}]" if v == v else "-"  # NaN: the uncapped cap
            for v, lo, hi in zip(result[name], result[f"{name}_low"], result[f"{name}_high"], strict=True)
        ]

    return pd.DataFrame(
        {
            "setting": result["setting"],
            "adoption %": points("persona_adoption"),
            "adoption reduction (pts)": points("adoption_reduction"),
            "accuracy %": points("accuracy"),
            "capability cost (pts)": points("capability_cost"),
            "cap fired %": points("fired"),
            "Pareto": result["pareto"],
            "recommended": result["recommended"],
        }
    )
