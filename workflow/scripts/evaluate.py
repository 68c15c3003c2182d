import torch

from assistant_axis import stages

sm = snakemake  # noqa: F821 (injected by Snakemake)
torch.set_num_threads(sm.threads)
with stages.logged(sm.log[0]):
    stages.evaluate(
        sm.input.model,
        sm.input.axis,
        list(sm.input.capping),
        sm.input.prompts,
        sm.input.capability,
        sm.params.sizes["n_prompts"],
        sm.params.sampling,
        sm.params.sizes["batch_size"],
        sm.params.sizes["layer"],
        sm.params.judge,
        sm.params.sweep,
        sm.output.responses,
        sm.output.summary,
        sm.output.plot,
        sm.output.pareto,
        sm.params.dtype,
        sm.params.trust_remote_code,
        sm.params.template_options,
        sm.params.backend,
        sm.params.vllm,
    )
