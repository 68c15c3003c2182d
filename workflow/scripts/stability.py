from assistant_axis import stages

sm = snakemake  # noqa: F821 (injected by Snakemake)
with stages.logged(sm.log[0]):
    stages.stability(
        list(sm.input.activations),
        list(sm.input.scores),
        list(sm.input.vectors),
        sm.input.axis,
        sm.params.layer,
        sm.params.sizes,
        sm.params.repeats,
        sm.params.seed,
        sm.params.min_score,
        sm.output.roles,
        sm.output.axis,
        sm.output.plot,
    )
