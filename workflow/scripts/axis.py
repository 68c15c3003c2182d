from assistant_axis import stages

sm = snakemake  # noqa: F821 (injected by Snakemake)
with stages.logged(sm.log[0]):
    stages.axis(
        list(sm.input.vectors),
        sm.output.axis,
        sm.output.axis_pt,
        sm.output.summary,
        model=sm.input.model,
        config_hash=sm.params.config_hash,
    )
