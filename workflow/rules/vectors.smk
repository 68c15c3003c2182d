rule vectors:
    input:
        model="results/{model}/model.json",  # to check the activations against
        activations="results/{model}/activations/{role}.safetensors",
        scores=scores_input,
    output:
        vector="results/{model}/vectors/{role}.safetensors",
    params:
        min_score=config["vectors"]["min_score"],
        min_count=config["vectors"]["min_count"],
    resources:
        **PLAN.jobs.resources("vectors"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/vectors/{role}.log",
    script:
        "../scripts/vectors.py"
