from assistant_axis import stages

sm = snakemake  # noqa: F821 (injected by Snakemake)
with stages.logged(sm.log[0]):
    stages.vectors(
        sm.input.activations,
        sm.output.vector,
        sm.wildcards.role,
        scores=sm.input.scores or None,
        model=sm.input.model,
        **sm.params,
    )
