from assistant_axis import stages

# Only the job's own process runs the stage: vLLM starts worker processes by spawn, which import this file
# again (as `__mp_main__`). Every script calls its stage alike: its files and the rule's params by keyword.
if __name__ == "__main__":
    sm = snakemake  # noqa: F821 (injected by Snakemake)
    with stages.logged(sm.log[0], sm.threads):
        stages.activations(
            model=sm.input.model, responses=list(sm.input.responses), outputs=list(sm.output.activations), **sm.params
        )
