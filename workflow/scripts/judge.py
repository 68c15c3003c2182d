from assistant_axis import stages

sm = snakemake  # noqa: F821 (injected by Snakemake)
with stages.logged(sm.log[0]):
    stages.judge(sm.input.responses, sm.output.scores, **sm.params.judge)
