import sys

from snakemake.utils import validate

from assistant_axis.errors import AxisError
from assistant_axis.plan import Plan


validate(config, schema="../schemas/config.schema.yaml")

try:
    PLAN = Plan.from_config(config)
except AxisError as exc:  # a bad role file or config value: one line, no traceback
    sys.exit(f"error: {exc}")

MODEL = PLAN.model
ROLES = PLAN.role_names


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


report_storage()
