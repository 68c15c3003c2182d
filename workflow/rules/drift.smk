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
        # One dict, not several numbers: Snakemake compares a rule's params as a set of values, so two
        # numeric params trading or sharing values (max_turns 2, last_turns 2 -> 1) would rerun nothing.
        drift={
            **config["evaluate"]["drift"],
            "batch_size": config["evaluate"]["batch_size"],
            "layer": config["analysis"]["layer"],
        },
        sampling={k: config["evaluate"][k] for k in ("temperature", "top_p", "max_tokens", "seed")},
        dtype=config["model"]["dtype"],
        trust_remote_code=config["model"]["trust_remote_code"],
        template_options=config["model"]["chat_template_kwargs"],
        # In the evaluate stage's engine: none for the default one, as before drift ran in others.
        **PLAN.params.drift_engine(),
    threads: PLAN.jobs.threads("drift", 2)
    resources:
        **PLAN.jobs.resources("drift"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/drift.log",
    script:
        "../scripts/drift.py"
