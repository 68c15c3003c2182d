from assistant_axis import stages

# Only the job's own process runs the stage: vLLM starts worker processes by spawn, which import this file
# again (as `__mp_main__`). Every script calls its stage alike: its files and the rule's params by keyword.
if __name__ == "__main__":
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    with stages.logged(sm.log[0]):
        stages.pca(
            vector_files=list(sm.input.vectors),
            axis_file=sm.input.axis,
            summary=sm.output.summary,
            components=sm.output.components,
            roles=sm.output.roles,
            plots={k: sm.output[k] for k in ("variance", "scatter", "layers")},
            **sm.params,
        )
