"""Kill anywhere: SIGKILL the whole workflow (Snakemake and its jobs) at seeded points spread over every
stage, recover as docs/running.md says (`snakemake --unlock`, then `snakemake --cores 2 --rerun-incomplete`,
itself killed again), and end with the uninterrupted run's artifacts, byte for byte.

Until every stage has been caught mid-job, each run is killed at a job of a stage not caught yet, in
turn: as the first such job starts (before it does anything: between jobs, as Snakemake sees it); a
seeded fraction (up to half) of its job time in the uninterrupted run after it starts, or sooner if a
job of another such stage starts meanwhile, so that stages running side by side are caught too; and as
such a job exits, after its last write and before Snakemake learns that it ended. Every kill lands where
it is aimed by construction, however fast the machine runs the jobs: jobs of those stages stop themselves
there (tests/hold_at_exit), and a stopped job is killed; a timed kill comes at the latest as a job exits.
So each kill mid-job catches a new stage. After every kill, every Parquet and safetensors file under
results/ must open: no truncated artifact under a final name.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from safetensors import safe_open

from workflow_helpers import SNAKEMAKE, make_workspace

SEED = 20261123
# The SLURM executor plugin runs `scontrol` when Snakemake starts; with no SLURM controller that waits
# ~9 s. These runs are local, so point it at an empty SLURM config: it fails at once.
ENV = {**os.environ, "SLURM_CONF": "/dev/null"}
ENV["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(Path(__file__).parent / "hold_at_exit"), os.environ.get("PYTHONPATH")])
)
INF = float("inf")  # a kill with no timer: at a held job only
HOLD = ".hold"  # where jobs stop themselves, and whose (tests/hold_at_exit)


def job_times(workdir: Path) -> tuple[list[str], dict[str, float]]:
    """Stages in the order their first job started, and each stage's median job time (s), from the
    Snakemake log of an uninterrupted run."""
    log = sorted((workdir / ".snakemake/log").glob("*.snakemake.log"))[0]  # the first: the full run
    order, starts, spans, now, rule = [], {}, {}, None, None
    for line in log.read_text().splitlines():
        if stamp := re.match(r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]$", line):
            now = datetime.strptime(stamp.group(1), "%a %b %d %H:%M:%S %Y").timestamp()
        elif start := re.match(r"^(?:local)?rule (\w+):$", line):
            rule = start.group(1)
        elif (job := re.match(r"^\s+jobid: (\d+)$", line)) and rule:
            starts[job.group(1)] = (rule, now)
            if rule != "all" and rule not in order:
                order.append(rule)
            rule = None
        elif done := re.match(r"^Finished jobid: (\d+)", line):
            name, began = starts[done.group(1)]
            spans.setdefault(name, []).append(now - began)
    return order, {name: max(1.0, statistics.median(times)) for name, times in spans.items()}


def run_and_kill(
    workdir: Path, args: list[str], killed: set[str], mode: str, fraction: float, seconds: dict
) -> dict | None:
    """Run Snakemake in its own process group and SIGKILL the group (see the module's docstring) at a job of
    a stage not in `killed`: at its "start", "timed" (`fraction` of its job time, at the latest at its
    exit), or at its "exit"; "none": no kill. None: the run finished."""
    hold = workdir / HOLD
    hold.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [*SNAKEMAKE, "--cores", "2", *args],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**ENV, "AXIS_HOLD_FILE": str(hold)},
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(x) for x in proc.stdout], lines.put(None)), daemon=True).start()
    output, planned, in_stats, aims, rule, held = [], {}, False, set(), None, []
    jobs, running, trigger, kill_at, jobid, started = {}, set(), None, None, None, 0.0  # jobs: id -> "rule[role]"
    while True:
        wait = None if kill_at in (None, INF) else max(0.0, kill_at - time.monotonic())
        if hold.exists():  # look for a held job every 0.1 s
            wait = 0.1 if wait is None else min(wait, 0.1)
        try:
            line = lines.get(timeout=wait)
        except queue.Empty:
            held = list(workdir.glob(f"{HOLD}.*"))
            if not held and time.monotonic() < (kill_at or INF):
                continue
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _wait_group_gone(proc.pid)
            stopped = ", ".join(sorted(path.read_text() for path in held))
            for path in [hold, *held]:
                path.unlink(missing_ok=True)
            where = f"{mode}: {jobs[trigger]} + {time.monotonic() - started:.1f} s"
            where += f" (held: {stopped})" if held else ""
            return {"where": where, "held": bool(held), "running": sorted(jobs[j] for j in running)}
        if line is None:
            hold.unlink(missing_ok=True)
            assert proc.wait() == 0, "".join(output[-60:])
            return None
        output.append(line)
        text = line.rstrip()
        if text == "Job stats:":
            in_stats = True
        elif in_stats and (row := re.match(r"^(\w+)\s+(\d+)$", text)):
            in_stats = row.group(1) != "total"
            if in_stats:
                planned[row.group(1)] = int(row.group(2))
            elif mode != "none":  # the stages not caught yet
                aims = {stage for stage in planned if stage != "all" and stage not in killed}
                hold.write_text(" ".join(["start" if mode == "start" else "exit", *sorted(aims)]))
                fraction = fraction * 0.4 if mode == "timed" else INF
        elif start := re.match(r"^(?:local)?rule (\w+):$", text):
            rule = start.group(1)
        elif (job := re.match(r"^\s+jobid: (\d+)$", text)) and rule:
            jobid, jobs[job.group(1)], rule = job.group(1), rule, None
            running.add(jobid)
            if jobs[jobid] in aims and kill_at is None:
                trigger, started = jobid, time.monotonic()
                kill_at = started + fraction * seconds.get(jobs[jobid], 1.0)
            elif kill_at not in (None, INF) and jobs[jobid] not in killed and jobs[jobid] != jobs[trigger]:
                kill_at = min(kill_at, time.monotonic() + 0.3 * seconds.get(jobs[jobid], 1.0))
        elif (wildcards := re.search(r"^\s+wildcards: .*role=(\w+)", text)) and jobid:
            jobs[jobid] += f"[{wildcards.group(1)}]"
        elif done := re.match(r"^Finished jobid: (\d+)", text):
            running.discard(done.group(1))


def _wait_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {pgid} outlived SIGKILL")


def artifacts(results: Path) -> list[Path]:
    """Every Parquet and safetensors file under results/ (the linked model folder is not followed)."""
    found = []
    for base, _dirs, files in os.walk(results):
        found += [Path(base) / f for f in files if f.endswith((".parquet", ".safetensors"))]
    return sorted(found)


def assert_all_open(results: Path) -> None:
    for path in artifacts(results):
        try:
            if path.suffix == ".parquet":
                pd.read_parquet(path)
            else:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        handle.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 (any failure to read is the finding)
            raise AssertionError(f"{path} does not open after a kill: {exc}") from exc


# A child writing an artifact of ~20 MB with our writers, killed where the test says, never by timing:
# - `limit` bytes: at its default action (Python ignores it) SIGXFSZ kills the writer the moment a file it
#   writes would pass the RLIMIT_FSIZE it was started with;
# - `rename`: it stops itself (SIGSTOP) just before renaming its finished temporary file into place.
WRITER = """
import os, signal, sys, numpy, pandas, torch
from assistant_axis import artifacts
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
kind, path, stop_before_rename = sys.argv[1], sys.argv[2], sys.argv[3] == "rename"
if stop_before_rename:
    def replace(src, dst, _replace=os.replace):
        os.kill(os.getpid(), signal.SIGSTOP)
        _replace(src, dst)
    artifacts.os.replace = replace
if kind == "safetensors":
    data = torch.ones(5, 1000, 1000)
else:  # random values: Parquet would compress a constant column to almost nothing
    data = pandas.DataFrame({"x": numpy.random.default_rng(0).random(2_500_000)})
print("writing", flush=True)
if kind == "safetensors":
    artifacts.write_tensors({"activations": data}, path, {"n": 1})
else:
    artifacts.write_parquet(data, path)
print("written", flush=True)
"""


@pytest.mark.parametrize("kind", ["safetensors", "parquet"])
def test_a_writer_killed_mid_write_keeps_the_old_artifact(tmp_path, kind):
    """Kill a writer of a large artifact at points spread over its write, each chosen by construction (see
    WRITER), whatever the machine's speed or load: at 20% to 95% of its bytes, and with every byte written
    but not yet renamed. Each time the final name still holds the previous artifact, whole; the next write
    replaces it and clears our stale temporaries. Parquet's writer grows its file as it writes, so its
    temporary file then holds exactly the bytes of the limit; safetensors' sizes its file before writing
    any data, so its kills by size land there."""
    import resource

    import torch

    from assistant_axis.artifacts import write_parquet, write_tensors

    target = tmp_path / f"big.{kind}"

    def write_small(value: float) -> None:
        if kind == "safetensors":
            write_tensors({"activations": torch.full((2, 3), value)}, target)
        else:
            write_parquet(pd.DataFrame({"x": [value, value]}), target)

    def writer(limit: int | None = None, stop: str = "") -> subprocess.Popen:
        def limit_file_size():
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, kind, str(target), stop],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=limit_file_size if limit else None,
        )
        assert child.stdout.readline().strip() == "writing"
        return child

    def held() -> int:  # bytes in our temporary files (safetensors writes into a temporary file of its own)
        return sum(p.stat().st_size for p in tmp_path.glob(f".{target.name}.*.tmp"))

    def digest() -> str:
        return hashlib.sha256(target.read_bytes()).hexdigest()

    child = writer()  # uninterrupted: the whole new artifact and its size
    assert child.stdout.readline().strip() == "written" and child.wait() == 0
    complete, size = digest(), target.stat().st_size
    write_small(1.0)
    before = digest()
    for fraction in (0.2, 0.4, 0.6, 0.75, 0.85, 0.95):
        limit = int(fraction * size)
        child = writer(limit)
        assert child.wait() == -signal.SIGXFSZ, f"the writer was not killed at {limit} of {size} bytes"
        assert held() == (limit if kind == "parquet" else 0), (held(), limit)
        assert digest() == before, f"killed at {limit} of {size} bytes: the old artifact is not whole"
    child = writer(stop="rename")
    _, status = os.waitpid(child.pid, os.WUNTRACED)  # it stopped itself with every byte written
    assert os.WIFSTOPPED(status) and held() == size
    child.kill()
    child.wait()
    assert digest() == before, "killed before its rename: the old artifact is not whole"
    write_small(2.0)
    assert list(tmp_path.glob(f".{target.name}.*.tmp")) == [] and digest() != complete
    if kind == "safetensors":
        with safe_open(str(target), framework="pt") as handle:
            assert handle.get_tensor("activations").eq(2.0).all()
    else:
        assert pd.read_parquet(target)["x"].tolist() == [2.0, 2.0]


@pytest.mark.slow
def test_killed_anywhere_and_recovered_gives_the_same_axis(tmp_path, model_dir, tiny_run, capsys):
    order, seconds = job_times(tiny_run)
    rng = random.Random(SEED)
    work = make_workspace(tmp_path / "work", model_dir)
    results = work / "results"
    kills, killed, args = [], set(), []
    started = time.monotonic()
    while killed != set(order):
        mode = ("start", "timed", "exit")[len(kills) % 3]
        kill = run_and_kill(work, args, killed, mode, rng.uniform(0.05, 1.25), seconds)
        assert kill is not None, f"the run finished before kill {len(kills) + 1}"
        caught = {job.split("[")[0] for job in kill["running"]} - {"all"}
        kills.append({**kill, "new": sorted(caught - killed) if mode != "start" else []})
        # By construction (see the module's docstring), or the holding is broken:
        assert kill["held"] or mode == "timed", f"kill {len(kills)} came before any job held: {kill}"
        assert caught - killed, f"kill {len(kills)} caught no stage not caught before: {kill}"
        if mode != "start":  # a job caught before it began is not caught mid-job
            killed |= caught
        assert_all_open(results)
        # Recovery, as in docs/running.md: release the lock, then rerun what was incomplete.
        unlock = subprocess.run([*SNAKEMAKE, "--unlock"], cwd=work, capture_output=True, text=True, env=ENV)
        assert unlock.returncode == 0, unlock.stderr[-3000:]
        args = ["--rerun-incomplete"]
    assert run_and_kill(work, args, killed, "none", 0.0, seconds) is None
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(f"\n{len(kills)} kills and recoveries in {elapsed:.0f} s (seed {SEED}):")
        for i, kill in enumerate(kills, 1):
            new = f"; caught first: {', '.join(kill['new'])}" if kill["new"] else ""
            print(f"  {i:2d}. {kill['where']}; running: {', '.join(kill['running'])}{new}")
    assert killed == set(order), f"stages never killed mid-job: {set(order) - killed}"
    dry = subprocess.run([*SNAKEMAKE, "-n", "--cores", "2"], cwd=work, capture_output=True, text=True, env=ENV)
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    # The same artifacts as the uninterrupted run, byte for byte (as docs/running.md says), Parquet included.
    ours, reference = artifacts(results), artifacts(tiny_run / "results")
    assert [p.relative_to(results) for p in ours] == [p.relative_to(tiny_run / "results") for p in reference]
    for mine, theirs in zip(ours, reference, strict=True):
        if mine.suffix == ".parquet" and mine.read_bytes() != theirs.read_bytes():  # say which values differ
            pd.testing.assert_frame_equal(pd.read_parquet(mine), pd.read_parquet(theirs), obj=str(mine))
        assert mine.read_bytes() == theirs.read_bytes(), mine
