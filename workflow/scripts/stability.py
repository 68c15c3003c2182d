from assistant_axis import stages

sm = snakemake  # noqa: F821 (injected by Snakemake)
with stages.logged(sm.log[0]):
    scores = {path.rsplit("/", 1)[-1].removesuffix(".parquet"): path for path in sm.input.scores}
    roles = [path.rsplit("/", 1)[-1].removesuffix(".safetensors") for path in sm.input.activations]
    stages.stability(
        list(sm.input.activations),
        [scores.get(role) for role in roles],
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
