rule stability:
    input:
        activations=expand("results/{{model}}/activations/{role}.safetensors", role=ROLES),
        scores=[f"results/{{model}}/scores/{role}.parquet" for role in ROLES if role != "default"],
        vectors=expand("results/{{model}}/vectors/{role}.safetensors", role=ROLES),
        axis="results/{model}/axis.safetensors",
    output:
        roles="results/{model}/stability/roles.parquet",
        axis="results/{model}/stability/axis.parquet",
        plot=report("results/{model}/stability/rollouts.png", caption="../report/stability.rst",
                    category="Stability"),
    params:
        layer=config["analysis"]["layer"],
        min_score=config["vectors"]["min_score"],
        **config["analysis"]["stability"],
    resources:
        **PLAN.jobs.resources("stability"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/stability.log",
    script:
        "../scripts/stability.py"
