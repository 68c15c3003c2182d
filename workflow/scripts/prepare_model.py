from assistant_axis import stages

with stages.logged(snakemake.log[0]):  # noqa: F821 (snakemake is injected)
    stages.prepare_model(
        snakemake.output.manifest,  # noqa: F821
        name=snakemake.wildcards.model,  # noqa: F821
        source=snakemake.params.source,  # noqa: F821
        models_dir="results/models",
        trust_remote_code=snakemake.params.trust_remote_code,  # noqa: F821
    )
