"""Imported at start-up by every Python process whose PYTHONPATH begins with this folder (test_kill.py
puts it there). A Snakemake script job of a rule named in the file $AXIS_HOLD_FILE stops itself
(SIGSTOP) as it exits, after its last write, and leaves `<hold file>.<pid>` to say so. A kill aimed at
such a job then lands before the job ends, however fast the machine runs it: by construction, not timing.
"""

import atexit
import os
import signal
import sys
from pathlib import Path


def _hold_at_exit() -> None:
    job = getattr(sys.modules.get("__main__"), "snakemake", None)  # the object Snakemake gives a script
    hold = Path(os.environ["AXIS_HOLD_FILE"])
    try:
        rules = hold.read_text().split()
    except FileNotFoundError:
        return
    if job is not None and job.rule in rules:
        Path(f"{hold}.{os.getpid()}").write_text(job.rule)
        os.kill(os.getpid(), signal.SIGSTOP)


if "AXIS_HOLD_FILE" in os.environ:
    atexit.register(_hold_at_exit)  # registered first, so it runs last: after every other exit handler
