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
        sm.params.n_scenarios,
        sm.params.max_turns,
        sm.params.settings,
        sm.params.sampling,
        sm.params.batch_size,
        sm.params.layer,
        sm.params.percentile,
        sm.params.last_turns,
        sm.output.transcripts,
        sm.output.trajectories,
        sm.output.summary,
        sm.output.plot,
        sm.output.table,
        sm.params.dtype,
        sm.params.trust_remote_code,
        sm.params.template_options,
    )
