# Scripted multi-turn conversations, uncapped and under the chosen capping settings: per-turn projections
# (as `assistant-axis project` computes them) and how far each setting lets the Assistant drift.
rule drift:
    input:
        model="results/{model}/model.json",
        axis="results/{model}/axis.safetensors",
        capping=expand("results/{{model}}/capping/{name}.safetensors", name=PLAN.params.capping_names()),
        default="results/{model}/activations/default.safetensors",
        scenarios=config["evaluate"]["drift"]["scenarios"],
    output:
        transcripts="results/{model}/drift/transcripts.parquet",
        trajectories="results/{model}/drift/trajectories.parquet",
        summary="results/{model}/drift/summary.parquet",
        plot=report("results/{model}/drift/drift.png", caption="../report/drift.rst", category="Drift"),
        table=report("results/{model}/drift/summary.html", caption="../report/drift_table.rst", category="Drift"),
    params:
        n_scenarios=config["evaluate"]["drift"]["n_scenarios"],
        max_turns=config["evaluate"]["drift"]["max_turns"],
        settings=config["evaluate"]["drift"]["settings"],
        sampling={k: config["evaluate"][k] for k in ("temperature", "top_p", "max_tokens", "seed")},
        batch_size=config["evaluate"]["batch_size"],
        layer=config["analysis"]["layer"],
        percentile=config["evaluate"]["drift"]["percentile"],
        last_turns=config["evaluate"]["drift"]["last_turns"],
        dtype=config["model"]["dtype"],
        trust_remote_code=config["model"]["trust_remote_code"],
        template_options=config["model"]["chat_template_kwargs"],
    threads: 2
    resources:
        **PLAN.jobs.resources("drift"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/drift.log",
    script:
        "../scripts/drift.py"
