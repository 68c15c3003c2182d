rule pca:
    input:
        vectors=expand("results/{{model}}/vectors/{role}.safetensors", role=ROLES),
        axis="results/{model}/axis.safetensors",
    output:
        summary="results/{model}/pca/summary.parquet",
        components="results/{model}/pca/components.parquet",
        roles="results/{model}/pca/roles.parquet",
        variance=report("results/{model}/pca/variance.png", caption="../report/pca_variance.rst", category="PCA"),
        scatter=report("results/{model}/pca/scatter.png", caption="../report/pca_scatter.rst", category="PCA"),
        layers=report("results/{model}/pca/layers.png", caption="../report/pca_layers.rst", category="PCA"),
    params:
        layer=config["analysis"]["layer"],
    resources:
        **PLAN.jobs.resources("pca"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/pca.log",
    script:
        "../scripts/pca.py"
