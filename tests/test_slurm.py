"""Cluster scale: the tiny config submitted to a real one-node SLURM (tests/slurm/up.sh), and shards."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from assistant_axis.plan import DEFAULT_RESOURCES

from conftest import need
from workflow_helpers import AXIS_AND_AFTER, ROOT, TINY_ROLES, make_workspace, planned_jobs, snakemake, tiny_config

pytestmark = pytest.mark.slow
# Every stage asks the one-node test cluster for little, so that a new stage cannot outgrow it.
SMALL = {stage: {"mem_mb": 1500, "runtime": 30} for stage in DEFAULT_RESOURCES}


@pytest.fixture(scope="module")
def slurm_env():
    need(shutil.which("sbatch") is not None and shutil.which("slurmctld") is not None,
         "SLURM is not installed (apt-get install slurm-wlm munge)")
    up = subprocess.run(["bash", str(ROOT / "tests/slurm/up.sh")], capture_output=True, text=True)
    need(up.returncode == 0, f"tests/slurm/up.sh could not start SLURM: {up.stderr[-500:]}")
    conf = re.search(r"export SLURM_CONF=(\S+)", up.stdout).group(1)
    return {"SLURM_CONF": conf}


def _job_table(output: str) -> tuple[dict[str, tuple[str, str | None]], dict[str, str]]:
    """(snakemake jobid -> (rule, role)), (slurm jobid -> snakemake jobid), from Snakemake's output."""
    table, slurm = {}, {}
    rule = job = None
    for line in output.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):", line):
            rule, job = m.group(1), None
        elif (m := re.match(r"^\s+jobid: (\d+)", line)) and rule:
            job = m.group(1)
            table[job] = (rule, None)
        elif (m := re.match(r"^\s+wildcards: (.*)", line)) and job:
            table[job] = (rule, dict(kv.split("=", 1) for kv in m.group(1).split(", ")).get("role"))
        if m := re.search(r"Job (\d+) has been submitted with SLURM jobid (\d+)", line):
            slurm[m.group(2)] = m.group(1)
            # Snakemake does not always print the rule block before a submission; the plugin's log path
            # (.../rule_<rule>/<model>[_<role>]/<id>.log) names the rule and wildcards too.
            if m.group(1) not in table and (where := re.search(r"/rule_(\w+)/([^/]+)/\d+\.log", line)):
                wildcards = where.group(2).split("_", 1)
                table[m.group(1)] = (where.group(1), wildcards[1] if len(wildcards) == 2 else None)
    return table, slurm


def _run_on_slurm(work: Path, env: dict) -> tuple[dict, dict]:
    result = snakemake(work, "--workflow-profile", str(ROOT / "tests/slurm/profile"), env=env)
    output = result.stdout + result.stderr
    table, slurm = _job_table(output)
    log = (Path(env["SLURM_CONF"]).parent / "log/slurmctld.log").read_text()
    submitted_in_log = set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", log))
    assert set(slurm) <= submitted_in_log, "every job Snakemake reports went through sbatch"
    return table, slurm

ANALYSIS = [(stage, None) for stage in AXIS_AND_AFTER]


def test_tiny_config_on_slurm_equals_the_local_run(tmp_path, model_dir, slurm_env, tiny_run, capsys):
    work = make_workspace(tmp_path / "slurm", model_dir, tiny_config(resources=SMALL))
    table, slurm = _run_on_slurm(work, slurm_env)
    submitted = sorted(table[j] for j in slurm.values())
    with capsys.disabled():
        print(f"\nSLURM job ids: {', '.join(sorted(slurm, key=int))}")
    roles = [*TINY_ROLES, "default"]
    expected = sorted([("prepare_model", None)] + [(r, role) for role in roles for r in ("generate", "activations",
                      "vectors")] + [("judge", role) for role in TINY_ROLES] + ANALYSIS)
    assert submitted == expected
    model = "results/smollm2-135m-instruct"
    on_slurm = torch.load(work / model / "axis.pt", weights_only=True)
    local = torch.load(tiny_run / model / "axis.pt", weights_only=True)
    assert torch.equal(on_slurm, local)

    # A one-role description edit, resubmitted: only that role's judge and vectors jobs and the axis.
    path = work / "data/roles/ghost.yaml"
    data = yaml.safe_load(path.read_text())
    data["description"] += " It rattles chains."
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    table, slurm = _run_on_slurm(work, slurm_env)
    rerun = sorted(table[j] for j in slurm.values())
    with capsys.disabled():
        print(f"after editing ghost's description, SLURM ran: {rerun} as jobs {sorted(slurm, key=int)}")
    assert rerun == sorted([("judge", "ghost"), ("vectors", "ghost"), *ANALYSIS])


def test_shards_plan_one_model_load_per_shard(tmp_path, model_dir):
    """The quickstart with `shards: 4`: four generate and four activations jobs."""
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    work = make_workspace(tmp_path, model_dir, config, bank=["*"])
    jobs = planned_jobs(work, "--config", "shards=4")
    generate = {r for r, _ in jobs if r.startswith("generate")}
    activations = {r for r, _ in jobs if r.startswith("activations")}
    assert generate == {f"generate_shard{i}" for i in range(4)}
    assert activations == {f"activations_shard{i}" for i in range(4)}


def test_adding_a_role_changes_exactly_one_shard(tmp_path, model_dir):
    config = tiny_config(resources=SMALL)
    config["roles"]["include"] = "all"
    config["shards"] = 2
    work = make_workspace(tmp_path, model_dir, config)
    snakemake(work)
    assert planned_jobs(work) == set()
    shutil.copy(ROOT / "data/roles/bard.yaml", work / "data/roles/bard.yaml")
    jobs = planned_jobs(work)
    shard_jobs = sorted(r for r, _ in jobs if "_shard" in r)
    assert len(shard_jobs) == 2 and shard_jobs[0].split("_")[-1] == shard_jobs[1].split("_")[-1]
    assert ("judge", "bard") in jobs and ("axis", None) in jobs
