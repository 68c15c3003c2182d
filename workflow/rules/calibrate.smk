# `capping.calibration: token` (the default) loads the model to project every default reply token, rendered
# as the activations stage renders it; `reply` uses the default activations (reply means) only.
rule calibrate:
    input:
        model="results/{model}/model.json",
        default="results/{model}/activations/default.safetensors",
        responses="results/{model}/responses/default.parquet",
        axis="results/{model}/axis.safetensors",
    output:
        percentiles="results/{model}/capping/percentiles.parquet",
        configs=expand("results/{{model}}/capping/{name}.safetensors", name=PLAN.params.capping_names()),
        plot=report("results/{model}/capping/thresholds.png", caption="../report/thresholds.rst",
                    category="Capping"),
    params:
        ranges=config["capping"]["ranges"],
        percentiles=config["capping"]["percentiles"],
        names=PLAN.params.capping_names(),
        calibration=config["capping"]["calibration"],
        model_settings=PLAN.params.calibration_model(),
    threads: 2
    resources:
        **PLAN.jobs.resources("calibrate"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/calibrate.log",
    script:
        "../scripts/calibrate.py"
