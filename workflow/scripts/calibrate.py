from assistant_axis import stages

# Only the job's own process runs the stage: vLLM starts worker processes by spawn, which import this file
# again (as `__mp_main__`). Every script calls its stage alike: its files and the rule's params by keyword.
if __name__ == "__main__":
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    with stages.logged(sm.log[0]):
        params = dict(sm.params.items())
        names, model_settings = params.pop("names"), params.pop("model_settings")
        stages.calibrate(
            default_activations=sm.input.default,
            axis_file=sm.input.axis,
            model=sm.input.model,
            table=sm.output.percentiles,
            configs=dict(zip(names, sm.output.configs, strict=True)),
            plot=sm.output.plot,
            responses=sm.input.responses,
            **params,
            **model_settings,
        )
