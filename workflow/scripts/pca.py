from assistant_axis import stages

sm = snakemake  # noqa: F821 (injected by Snakemake)
with stages.logged(sm.log[0]):
    stages.pca(
        list(sm.input.vectors),
        sm.input.axis,
        sm.params.layer,
        sm.output.summary,
        sm.output.components,
        sm.output.roles,
        {k: sm.output[k] for k in ("variance", "scatter", "layers")},
    )
