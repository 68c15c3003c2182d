# The Assistant Axis: generate -> activations -> judge -> vectors -> axis, then the analyses that use
# it: pca, stability, calibrate (the capping sweep), evaluate (its trade-off) and drift (see README.md).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare_model.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/judge.smk"
include: "workflow/rules/vectors.smk"
include: "workflow/rules/axis.smk"
include: "workflow/rules/pca.smk"
include: "workflow/rules/stability.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/drift.smk"


rule all:
    input:
        f"results/{MODEL}/axis.safetensors",
        f"results/{MODEL}/pca/summary.parquet",
        f"results/{MODEL}/stability/roles.parquet",
        f"results/{MODEL}/capping/percentiles.parquet",
        f"results/{MODEL}/evaluation/summary.parquet",
        f"results/{MODEL}/drift/summary.parquet",
    default_target: True
