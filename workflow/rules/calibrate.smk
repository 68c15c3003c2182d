rule calibrate:
    input:
        model="results/{model}/model.json",
        default="results/{model}/activations/default.safetensors",
        axis="results/{model}/axis.safetensors",
    output:
        percentiles="results/{model}/capping/percentiles.parquet",
        configs=expand("results/{{model}}/capping/{name}.safetensors", name=PLAN.capping_names()),
        plot=report("results/{model}/capping/thresholds.png", caption="../report/thresholds.rst",
                    category="Capping"),
    params:
        ranges=config["capping"]["ranges"],
        percentiles=config["capping"]["percentiles"],
        names=PLAN.capping_names(),
    resources:
        **PLAN.resources("calibrate"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/calibrate.log",
    script:
        "../scripts/calibrate.py"
