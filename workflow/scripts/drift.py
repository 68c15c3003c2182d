import torch

from assistant_axis import stages

sm = snakemake  # noqa: F821 (injected by Snakemake)
torch.set_num_threads(sm.threads)
with stages.logged(sm.log[0]):
    stages.drift(
        sm.input.model,
        sm.input.axis,
        list(sm.input.capping),
        sm.input.default,
        sm.input.scenarios,
        sm.params.drift["n_scenarios"],
        sm.params.drift["max_turns"],
        sm.params.drift["settings"],
        sm.params.sampling,
        sm.params.drift["batch_size"],
        sm.params.drift["layer"],
        sm.params.drift["percentile"],
        sm.params.drift["last_turns"],
        sm.output.transcripts,
        sm.output.trajectories,
        sm.output.summary,
        sm.output.plot,
        sm.output.table,
        sm.params.dtype,
        sm.params.trust_remote_code,
        sm.params.template_options,
    )
