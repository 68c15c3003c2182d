rule prepare_model:
    output:
        manifest="results/{model}/model.json",
    params:
        source=config["model"]["source"],
        trust_remote_code=config["model"]["trust_remote_code"],
    resources:
        **PLAN.jobs.resources("prepare_model"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/prepare_model.log",
    script:
        "../scripts/prepare_model.py"
