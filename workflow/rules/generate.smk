rule generate:
    input:
        model="results/{model}/model.json",
    output:
        responses="results/{model}/responses/{role}.parquet",
    params:
        system_prompts=lambda wc: PLAN.system_prompts(wc.role),
        questions=PLAN.question_params(),
        backend=config["generate"]["backend"],
        settings={k: v for k, v in config["generate"].items() if k != "backend"},
        dtype=config["model"]["dtype"],
    threads: 2
    conda:
        "../../environment.yml"
    log:
        "logs/{model}/generate/{role}.log",
    script:
        "../scripts/generate.py"
