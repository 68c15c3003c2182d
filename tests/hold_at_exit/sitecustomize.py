"""Imported at start-up by every Python process whose PYTHONPATH begins with this folder (test_kill.py
puts it there). A Snakemake script job of a rule that the file $AXIS_HOLD_FILE names stops itself
(SIGSTOP) and leaves `<hold file>.<pid>` to say so. The file's first word says where:
- `start`: as the job's interpreter starts, before the job does anything;
- `exit`: as it exits, after its last write.
A kill aimed at such a job then lands where the test says, however fast the machine runs the jobs: by
construction, not timing.
"""

import atexit
import os
import signal
import sys
from pathlib import Path


def _said() -> list[str] | None:
    try:
        return Path(os.environ["AXIS_HOLD_FILE"]).read_text().split()
    except FileNotFoundError:
        return None


def _hold(rule: str) -> None:
    Path(f"{os.environ['AXIS_HOLD_FILE']}.{os.getpid()}").write_text(rule)
    os.kill(os.getpid(), signal.SIGSTOP)


def _hold_at_exit() -> None:
    job = getattr(sys.modules.get("__main__"), "snakemake", None)  # the object Snakemake gives a script
    said = _said() or [""]
    if job is not None and said[0] == "exit" and job.rule in said[1:]:
        _hold(job.rule)


if "AXIS_HOLD_FILE" in os.environ:
    script = Path(sys.argv[0] if sys.argv else "")
    said = _said() or [""]
    # Snakemake runs a rule's script as .snakemake/scripts/tmpXXXXXXXX.<script>.py; ours are named as their rules.
    if script.parent.name == "scripts" and script.parent.parent.name == ".snakemake" and said[0] == "start":
        if script.stem.split(".")[-1] in said[1:]:
            _hold(script.stem.split(".")[-1])
    atexit.register(_hold_at_exit)  # registered first, so it runs last: after every other exit handler
