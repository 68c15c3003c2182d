import torch

from assistant_axis import stages

# vLLM starts its engine and worker processes by spawn, which imports this file again (as `__mp_main__`):
# only the job's own process runs the stage.
if __name__ == "__main__":
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(sm.threads)
    with stages.logged(sm.log[0]):
        captured = list(getattr(sm.output, "activations", []))
        stages.generate(sm.input.model, list(sm.output.responses), activation_outputs=captured, **sm.params)
