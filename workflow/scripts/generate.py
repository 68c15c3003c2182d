import torch

from assistant_axis import stages

sm = snakemake  # noqa: F821 (injected by Snakemake)
torch.set_num_threads(sm.threads)
with stages.logged(sm.log[0]):
    stages.generate(sm.input.model, list(sm.output.responses), **sm.params)
