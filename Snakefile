# The Assistant Axis: generate -> activations -> judge -> vectors -> axis (see README.md).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare_model.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/judge.smk"
include: "workflow/rules/vectors.smk"
include: "workflow/rules/axis.smk"


rule all:
    input:
        f"results/{MODEL}/axis.safetensors",
    default_target: True
