"""The workflow's stages, one module per stage (or close pair): each function reads its inputs, calls the
library and writes its outputs atomically.

The Snakemake scripts in `workflow/scripts/` call one of these with keyword arguments (the rule's files
and its params), inside `logged` (the job's log; a user error as one line), so every stage can also be
run and tested from Python. `common` holds what they share. Where to add a stage: a module here (its
function exported below), a script, a rules file included by the Snakefile, and its default resources in
`plan.jobs.DEFAULT_RESOURCES`; `common.config_keys` names the config keys that set the library arguments
it passes, for its error messages.
"""

from assistant_axis.stages.activations import activations
from assistant_axis.stages.analysis import pca, stability
from assistant_axis.stages.axis import axis, vectors
from assistant_axis.stages.calibrate import calibrate
from assistant_axis.stages.common import OPTIONAL_RESPONSE_COLUMNS, RESPONSE_COLUMNS, SCORE_COLUMNS, logged
from assistant_axis.stages.drift import drift
from assistant_axis.stages.evaluate import evaluate
from assistant_axis.stages.generate import generate
from assistant_axis.stages.judge import judge
from assistant_axis.stages.model import prepare_model

__all__ = [
    "logged",
    "prepare_model",
    "generate",
    "activations",
    "judge",
    "vectors",
    "axis",
    "pca",
    "stability",
    "calibrate",
    "evaluate",
    "drift",
    "RESPONSE_COLUMNS",
    "OPTIONAL_RESPONSE_COLUMNS",
    "SCORE_COLUMNS",
]
