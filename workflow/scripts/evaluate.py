from assistant_axis import stages

# Only the job's own process runs the stage: vLLM starts worker processes by spawn, which import this file
# again (as `__mp_main__`). Every script calls its stage alike: its files and the rule's params by keyword.
if __name__ == "__main__":
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    with stages.logged(sm.log[0], sm.threads):
        params = dict(sm.params.items())
        stages.evaluate(
            model=sm.input.model,
            axis_file=sm.input.axis,
            capping_files=list(sm.input.capping),
            prompts_file=sm.input.prompts,
            capability_file=sm.input.capability,
            responses=sm.output.responses,
            summary=sm.output.summary,
            plot=sm.output.plot,
            pareto=sm.output.pareto,
            **params.pop("sizes"),
            **params,
        )
