import torch

from assistant_axis import stages

# vLLM (activations.backend: vllm) starts worker processes by spawn, which imports this file again.
if __name__ == "__main__":
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    torch.set_num_threads(sm.threads)
    with stages.logged(sm.log[0]):
        stages.activations(sm.input.model, list(sm.input.responses), list(sm.output.activations), **sm.params)
