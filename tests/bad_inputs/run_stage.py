"""Run one workflow stage as its Snakemake script does, outside Snakemake (which deletes a job's old
outputs before it starts): `python run_stage.py STAGE LOG KWARGS_JSON`. Pointed at existing outputs,
it shows that a stage given a bad input fails in one line and leaves every existing artifact as it was; a stage
that starts an engine of its own runs here beside the tests' in-process one, whose state its shutdown would take."""

import json
import sys

from assistant_axis import stages

if __name__ == "__main__":  # a stage that starts a vLLM engine spawns processes that import this file again
    stage, log, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    with stages.logged(log):
        getattr(stages, stage)(**kwargs)
