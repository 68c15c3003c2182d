import sys
from pathlib import Path

from assistant_axis.errors import AxisError
from assistant_axis.plan import Plan


def config_files():
    """The config files in use, lowest precedence first (`configfile:`, then --configfile), as given."""
    cwd, shown = Path.cwd(), {}
    cli = [Path(f).resolve() for f in workflow.overwrite_configfiles]
    for f in [f for f in workflow.configfiles if Path(f).resolve() not in cli] + cli:
        path = Path(f).resolve()
        shown.pop(path, None)
        shown[path] = str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)
    return list(shown.values())


try:  # the schema, role files, questions, values checked against the model: one line, no traceback
    PLAN = Plan.for_workflow(config, workflow.source_path("../schemas/config.schema.yaml"), config_files())
except AxisError as exc:
    sys.exit(f"error: {exc}")

MODEL = PLAN.model
ROLES = PLAN.role_names

# One request budget per API section for the whole workflow: each API job holds one `<section>_api_jobs`
# and runs at rate / jobs, so all of them together stay within the configured rate (on SLURM too:
# Snakemake's scheduler enforces global resources). `--resources judge_api_jobs=N` overrides.
for section in ("generate", "judge"):
    if f"{section}_api_jobs" not in workflow.global_resources:
        workflow.register_resource(f"{section}_api_jobs", PLAN.jobs.api_jobs(section))


wildcard_constraints:
    model=MODEL,
    role="|".join(ROLES),


def scores_input(wildcards):
    """The default role is not judged: its vector uses all of its responses."""
    if wildcards.role == "default":
        return []
    return f"results/{wildcards.model}/scores/{wildcards.role}.parquet"


def report_storage():
    """Print the activations' disk footprint when planning, before anything runs."""
    size = PLAN.activation_bytes()
    if size is None:
        print("activations: size unknown until the model is prepared (set model.n_layers/hidden_size)",
              file=sys.stderr)
    else:
        print(f"activations: {PLAN.n_responses} responses, {size / 1e9:.2f} GB on disk", file=sys.stderr)


def report_judge_cost():
    """Print what an API judge will cost (requests, tokens, USD with judge.openai.prices), before anything runs.
    Only in the process that plans the run: a job started on a cluster node plans again, and needs no estimate."""
    cost = PLAN.judge_cost() if workflow.is_main_process else None
    for line in cost.lines() if cost else []:
        print(line, file=sys.stderr)


report_storage()
report_judge_cost()
