rule axis:
    input:
        model="results/{model}/model.json",  # its depth: the axis is indexed by block
        vectors=expand("results/{{model}}/vectors/{role}.safetensors", role=ROLES),
    output:
        axis="results/{model}/axis.safetensors",
        axis_pt="results/{model}/axis.pt",
        summary="results/{model}/vectors/summary.parquet",
    params:
        config_hash=PLAN.params.axis_config_hash(),
    resources:
        **PLAN.jobs.resources("axis"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/axis.log",
    script:
        "../scripts/axis.py"
