rule evaluate:
    input:
        model="results/{model}/model.json",
        axis="results/{model}/axis.safetensors",
        capping=expand("results/{{model}}/capping/{name}.safetensors", name=PLAN.params.capping_names()),
        prompts=config["evaluate"]["prompts"],
    output:
        responses="results/{model}/evaluation/responses.parquet",
        summary="results/{model}/evaluation/summary.parquet",
        plot=report("results/{model}/evaluation/tradeoff.png", caption="../report/evaluation.rst",
                    category="Evaluation"),
    params:
        n_prompts=config["evaluate"]["n_prompts"],
        sampling={k: config["evaluate"][k] for k in ("temperature", "top_p", "max_tokens", "seed")},
        batch_size=config["evaluate"]["batch_size"],
        layer=config["analysis"]["layer"],
        # A function: the judge template holds {placeholders} that Snakemake would otherwise expand.
        judge=lambda wc: PLAN.params.evaluation_judge(),
        dtype=config["model"]["dtype"],
        trust_remote_code=config["model"]["trust_remote_code"],
        template_options=config["model"]["chat_template_kwargs"],
        backend=config["evaluate"]["backend"],
        vllm=config["evaluate"]["vllm"],
    threads: 2
    resources:
        **PLAN.jobs.resources("evaluate"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/evaluate.log",
    script:
        "../scripts/evaluate.py"
