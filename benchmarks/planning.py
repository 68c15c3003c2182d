"""Planning: how long `snakemake -n` takes on the paper-scale config (every role of the bank)."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import time

from benchmarks.harness import ROOT, Table, require


def run(repeat: int, table: Table) -> None:
    # `--quiet all` silences the listing; the target is the default one, rule all.
    command = [sys.executable, "-m", "snakemake", "-n", "--quiet", "all", "--configfile", "config/paper.yaml"]
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        require(result.returncode == 0, f"planning failed: {result.stderr[-2000:]}")
        best_wall = min(best_wall, wall)
        best_cpu = min(best_cpu, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    table.report(
        "planning config/paper.yaml (snakemake -n)",
        f"{best_wall:.1f} s",
        f"target < 10 s; CPU time {best_cpu:.1f} s; best of {repeat}",
    )
    # Where SLURM's commands are installed, the SLURM executor plugin runs `scontrol show config` while
    # Snakemake loads it, on every start: instant on a live cluster, up to ~9 s where the configured
    # controller does not answer. Timed here so that a slow planning figure can be told apart from it.
    if shutil.which("scontrol"):
        start = time.perf_counter()
        subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=60)
        table.report(
            "  of which SLURM plugin's scontrol probe",
            f"{time.perf_counter() - start:.1f} s",
            "`scontrol show config`, run by the SLURM executor plugin when Snakemake starts",
        )
