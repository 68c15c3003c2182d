# Every setting of the sweep (uncapped, then capping.ranges x capping.percentiles) answers the persona and
# capability prompts; the summary gives each estimate with a bootstrap interval, the Pareto front and the
# setting that evaluate.sweep's rule recommends.
rule evaluate:
    input:
        model="results/{model}/model.json",
        axis="results/{model}/axis.safetensors",
        capping=expand("results/{{model}}/capping/{name}.safetensors", name=PLAN.params.capping_names()),
        prompts=config["evaluate"]["prompts"],
        capability=config["evaluate"]["capability"],
    output:
        responses="results/{model}/evaluation/responses.parquet",
        summary="results/{model}/evaluation/summary.parquet",
        plot=report("results/{model}/evaluation/sweep.png", caption="../report/sweep.rst", category="Evaluation"),
        pareto=report("results/{model}/evaluation/pareto.html", caption="../report/pareto.rst",
                      category="Evaluation"),
    params:
        # One dict, not several numbers: Snakemake compares params as a set of values (see drift.smk).
        sizes={
            "n_prompts": config["evaluate"]["n_prompts"],
            "batch_size": config["evaluate"]["batch_size"],
            "layer": config["analysis"]["layer"],
        },
        sampling={k: config["evaluate"][k] for k in ("temperature", "top_p", "max_tokens", "seed")},
        # A function: the judge template holds {placeholders} that Snakemake would otherwise expand.
        judge=lambda wc: PLAN.params.evaluation_judge(),
        sweep=config["evaluate"]["sweep"],
        dtype=config["model"]["dtype"],
        trust_remote_code=config["model"]["trust_remote_code"],
        template_options=config["model"]["chat_template_kwargs"],
        backend=config["evaluate"]["backend"],
        vllm=config["evaluate"]["vllm"],
    threads: PLAN.jobs.threads("evaluate", 2)
    resources:
        **PLAN.jobs.resources("evaluate"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/evaluate.log",
    script:
        "../scripts/evaluate.py"
