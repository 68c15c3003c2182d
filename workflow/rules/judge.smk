rule judge:
    input:
        responses="results/{model}/responses/{role}.parquet",
    output:
        scores="results/{model}/scores/{role}.parquet",
    # Only what judging reads: editing a role's description reruns its judge, not its generation.
    # Functions, because a template holds {placeholders} that Snakemake would otherwise expand.
    params:
        judge=lambda wc: PLAN.params.judge(wc.role),
    threads: PLAN.jobs.threads("judge", 1)
    resources:
        **PLAN.jobs.resources("judge"),
    conda:
        "../envs/assistant-axis.yaml"
    log:
        "logs/{model}/judge/{role}.log",
    script:
        "../scripts/judge.py"
