from assistant_axis import stages

# Only the job's own process runs the stage: vLLM starts worker processes by spawn, which import this file
# again (as `__mp_main__`). Every script calls its stage alike: its files and the rule's params by keyword.
if __name__ == "__main__":
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    with stages.logged(sm.log[0], sm.threads):
        params = dict(sm.params.items())
        drift = {k: v for k, v in params.pop("drift").items() if k != "scenarios"}  # the file is an input
        stages.drift(
            model=sm.input.model,
            axis_file=sm.input.axis,
            capping_files=list(sm.input.capping),
            default_activations=sm.input.default,
            scenarios_file=sm.input.scenarios,
            transcripts=sm.output.transcripts,
            trajectories=sm.output.trajectories,
            summary=sm.output.summary,
            plot=sm.output.plot,
            table=sm.output.table,
            **drift,
            **params,
        )
