from assistant_axis import stages

sm = snakemake  # noqa: F821 (injected by Snakemake)
with stages.logged(sm.log[0]):
    stages.calibrate(
        sm.input.default,
        sm.input.axis,
        sm.input.model,
        sm.params.ranges,
        sm.params.percentiles,
        sm.output.percentiles,
        dict(zip(sm.params.names, sm.output.configs, strict=True)),
        sm.output.plot,
        calibration=sm.params.calibration,
        responses=sm.input.responses,
        **sm.params.model_settings,
    )
