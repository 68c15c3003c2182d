"""Cluster scale: the tiny config's per-role stages and a paper-shaped config's whole DAG submitted to a real
one-node SLURM with a `cpu` and a `gpu` partition (tests/slurm/up.sh), through the product's profile
(profiles/slurm); and shards."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from fake_openai import FakeOpenAI, completion
from test_vllm import _need_vllm

from assistant_axis.plan import DEFAULT_RESOURCES, Plan, validate_config

from conftest import need
from workflow_helpers import (
    ROOT,
    SNAKEMAKE,
    TINY_ROLES,
    make_workspace,
    planned_jobs,
    snakemake,
    tiny_config,
)

pytestmark = pytest.mark.slow
# Every stage asks the one-node test cluster for little, so that a new stage cannot outgrow it.
SMALL = {stage: {"mem_mb": 1500, "runtime": 30} for stage in DEFAULT_RESOURCES}


@pytest.fixture(scope="module")
def slurm_env():
    need(
        shutil.which("sbatch") is not None and shutil.which("slurmctld") is not None,
        "SLURM is not installed (apt-get install slurm-wlm munge)",
    )
    up = subprocess.run(["bash", str(ROOT / "tests/slurm/up.sh")], capture_output=True, text=True)
    need(up.returncode == 0, f"tests/slurm/up.sh could not start SLURM: {up.stderr[-500:]}")
    conf = re.search(r"export SLURM_CONF=(\S+)", up.stdout).group(1)
    # The test node declares 16 CPUs on a machine with 2, so SLURM runs jobs side by side that a real node
    # would give cores of their own. OpenMP threads spin while they wait for each other (its default
    # policy): two 2-thread jobs on 2 cores then ran a small model 24-86x slower than one alone (measured
    # here); waiting threads that sleep cost one alone ~2x on the smallest matmuls instead.
    return {"SLURM_CONF": conf, "OMP_WAIT_POLICY": "PASSIVE"}


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


# As a user submits: their site profile (here the test cluster's) and the workflow's own profile.
PROFILES = ("--profile", str(ROOT / "tests/slurm/profile"), "--workflow-profile", str(ROOT / "profiles/slurm"))


def _start(work: Path, env: dict, *targets: str) -> subprocess.Popen:
    """Submit the workflow to SLURM as docs/slurm.md does, without waiting for it (see `_finish`).

    No `--cores` (the `snakemake` helper passes 2): Snakemake caps every job's threads at `--cores`, remote
    jobs too, so it would shrink what a job asks SLURM for below what the workflow gives it."""
    return subprocess.Popen(
        [*SNAKEMAKE, *PROFILES, *targets],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def _finish(process: subprocess.Popen, env: dict) -> tuple[dict, dict, str]:
    """Wait for a submission to end: its job table (see _job_table) and Snakemake's output."""
    stdout, stderr = process.communicate()
    output = stdout + stderr
    assert process.returncode == 0, f"snakemake on SLURM failed:\n{stdout[-4000:]}\n{stderr[-4000:]}"
    table, slurm = _job_table(output)
    log = (Path(env["SLURM_CONF"]).parent / "log/slurmctld.log").read_text()
    submitted_in_log = set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", log))
    assert set(slurm) <= submitted_in_log, "every job Snakemake reports went through sbatch"
    return table, slurm, output


def _submit(work: Path, env: dict, *targets: str) -> tuple[dict, dict, str]:
    return _finish(_start(work, env, *targets), env)


def _run_on_slurm(work: Path, env: dict, *targets: str) -> tuple[dict, dict]:
    table, slurm, _ = _submit(work, env, *targets)
    return table, slurm


# One role and `default` through their vectors: every per-role stage (the paper-shaped test below submits
# the whole DAG), in a few SLURM jobs. What these files hold does not depend on the other roles.
SLURM_ROLES = ("pirate", "default")
MODEL = "results/smollm2-135m-instruct"
TARGETS = [f"{MODEL}/vectors/{role}.safetensors" for role in SLURM_ROLES]
PER_ROLE = ("responses/{}.parquet", "activations/{}.safetensors", "scores/{}.parquet", "vectors/{}.safetensors")


@pytest.fixture(scope="module")
def tiny_submission(tmp_path_factory, model_dir, slurm_env, paper_run):
    """The tiny config's per-role stages submitted to SLURM after the paper-shaped config (paper_run), both
    not waited for: (workspace, process). Their jobs mostly wait (the executor plugin pauses 5 s before
    each sbatch and polls at intervals growing by 10 s), so the local shard run below computes meanwhile."""
    work = make_workspace(tmp_path_factory.mktemp("slurm"), model_dir, tiny_config(resources=SMALL))
    process = _start(work, slurm_env, *TARGETS)
    try:
        yield work, process
    finally:
        if process.poll() is None:  # a test failed before waiting for it
            process.kill()
            process.wait()


def test_shards_plan_one_model_load_per_shard(tmp_path, model_dir):
    """The quickstart with `shards: 4`: four generate and four activations jobs."""
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    work = make_workspace(tmp_path, model_dir, config, bank=["*"])
    jobs = planned_jobs(work, "--config", "shards=4")
    generate = {r for r, _ in jobs if r.startswith("generate")}
    activations = {r for r, _ in jobs if r.startswith("activations")}
    assert generate == {f"generate_shard{i}" for i in range(4)}
    assert activations == {f"activations_shard{i}" for i in range(4)}


def test_adding_a_role_changes_exactly_one_shard(tmp_path, model_dir, request):
    """Two shards run; a new role file lands in one of them, and only that shard's two jobs rerun.

    Where SLURM is installed, the SLURM submissions start first and run beside this local run (see
    `tiny_submission`); its OpenMP threads then sleep while they wait, as the SLURM jobs' do (slurm_env)."""
    if shutil.which("sbatch"):
        request.getfixturevalue("tiny_submission")
    config = tiny_config(resources=SMALL)
    config["roles"]["include"] = "all"
    config["shards"] = 2
    work = make_workspace(tmp_path, model_dir, config)

    # Only what the shard rules write: the stages after them are per role (the workflow tests cover those).
    def shard_outputs(roles):
        return [f"{MODEL}/responses/{r}.parquet" for r in roles] + [
            f"{MODEL}/activations/{r}.safetensors" for r in roles
        ]

    targets = shard_outputs([*TINY_ROLES, "default"])
    snakemake(work, *targets, env={"OMP_WAIT_POLICY": "PASSIVE"})
    assert planned_jobs(work, *targets) == set()
    shutil.copy(ROOT / "data/roles/bard.yaml", work / "data/roles/bard.yaml")
    shard_jobs = sorted(rule for rule, _ in planned_jobs(work, *targets, *shard_outputs(["bard"])))
    assert len(shard_jobs) == 2 and shard_jobs[0].split("_")[-1] == shard_jobs[1].split("_")[-1], shard_jobs
    jobs = planned_jobs(work)
    assert ("judge", "bard") in jobs and ("axis", None) in jobs


def test_tiny_config_on_slurm_equals_the_local_run(tiny_submission, slurm_env, tiny_run, capsys):
    work, process = tiny_submission
    table, slurm, _ = _finish(process, slurm_env)
    submitted = sorted(table[j] for j in slurm.values())
    with capsys.disabled():
        print(f"\nSLURM job ids: {', '.join(sorted(slurm, key=int))}")
    expected = sorted(
        [("prepare_model", None), ("judge", "pirate")]
        + [(rule, role) for role in SLURM_ROLES for rule in ("generate", "activations", "vectors")]
    )
    assert submitted == expected
    # Byte for byte what the local run wrote.
    files = [
        pattern.format(role)
        for role in SLURM_ROLES
        for pattern in PER_ROLE
        if (tiny_run / MODEL / pattern.format(role)).exists()
    ]
    assert len(files) == 7  # default has no scores
    for name in files:
        assert (work / MODEL / name).read_bytes() == (tiny_run / MODEL / name).read_bytes(), name

    # A one-role description edit, resubmitted: the SLURM jobs recorded what they ran, so only that role's
    # judge and vectors jobs run again.
    path = work / "data/roles/pirate.yaml"
    data = yaml.safe_load(path.read_text())
    data["description"] += " It counts doubloons."
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    table, slurm = _run_on_slurm(work, slurm_env, *TARGETS)
    rerun = sorted(table[j] for j in slurm.values())
    with capsys.disabled():
        print(f"after editing the pirate's description, SLURM ran: {rerun} as jobs {sorted(slurm, key=int)}")
    assert rerun == [("judge", "pirate"), ("vectors", "pirate")]


# ------------------------------------------------------------------ paper-shaped: partitions and resources

# The `threads:` each rule gives Plan.threads as its default (1 where a rule sets none).
RULE_THREADS = {"generate": 2, "activations": 2, "judge": 1, "evaluate": 2, "drift": 2, "calibrate": 2}
# vLLM's CPU build on the bundled model, as tests/test_vllm.py runs it: a small KV cache, no graphs.
VLLM_CPU = {"kv_cache_memory_bytes": 256 * 2**20, "max_model_len": 2048, "enforce_eager": True}
# The statement, independent of the plan: the stages that run the model's weights ask for GPUs
# (calibrate too: paper.yaml calibrates on every token of the default replies, a pass through the model).
MODEL_STAGES_ON_GPU = {"generate", "activations", "evaluate", "drift", "calibrate"}
CPU_STAGES = {"prepare_model", "judge", "vectors", "axis", "pca", "stability"}


def paper_shaped_config(judge_url: str) -> dict:
    """config/paper.yaml with the bundled model at the tiny config's sizes: the same sections and backends
    (vLLM generation with model.gpus: 2, an OpenAI judge, every analysis), and `shards: 1` for the shard rules."""
    config = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    tiny = tiny_config()
    for key in ("n_layers", "hidden_size"):  # Qwen3-32B's, for the storage estimate
        config["model"].pop(key)
    config["model"].update(tiny["model"])  # the bundled model; gpus: 2 and the template options stay
    assert config["model"]["gpus"] == 2
    config["roles"].update(include=list(TINY_ROLES), n_prompts=2)
    config["questions"]["n_questions"] = 2
    config["generate"]["max_tokens"] = 16
    # vLLM's CPU build: the GPUs SLURM gives the job are only scheduled, never used. One worker (tp 1).
    config["generate"]["vllm"] = {"tensor_parallel_size": 1, **VLLM_CPU}
    config["activations"].update(dtype="float32", vllm={"tensor_parallel_size": 1, **VLLM_CPU})
    config["judge"]["openai"].update(base_url=judge_url, model="fake-judge", api_key_env=None)
    config["vectors"] = tiny["vectors"]
    config["analysis"] = {"layer": 15, **tiny["analysis"]}
    config["evaluate"].update(tiny["evaluate"])
    assert config["evaluate"]["backend"] == "vllm"  # every setting in one engine, as the paper config runs it
    config["evaluate"]["vllm"] = {"tensor_parallel_size": 1, **VLLM_CPU}  # 9 heads: tensor parallel 2 cannot split them
    config["capping"].update(tiny["capping"])  # one capping config, not the paper's 16
    config["shards"] = 1
    # Another memory and time limit for every stage, so that a job given another stage's shows.
    config["resources"] = {
        stage: {"mem_mb": 1000 + 100 * i, "runtime": 20 + i} for i, stage in enumerate(DEFAULT_RESOURCES)
    }
    return config


def _judge_reply(body: dict, auth: str) -> tuple[int, dict]:
    """A judge that is sure of a 3 (its first token's top logprobs over the digits)."""
    return 200, completion("3", [("3", -0.05), ("2", -3.0), ("1", -5.0), ("0", -7.0)])


def _slurm_record(job_id: str, env: dict) -> dict[str, str]:
    """The controller's record of a job (`scontrol show job -o`, kept MinJobAge after it ends)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, env={**os.environ, **env}, check=True
    ).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _megabytes(value: str) -> int:
    number, unit = re.fullmatch(r"([\d.]+)([KMGT]?)", value).groups()
    return round(float(number) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[unit])


def _minutes(value: str) -> int:
    days, _, clock = value.rpartition("-")
    hours, minutes, seconds = (int(x) for x in clock.split(":"))
    return (int(days or 0) * 24 + hours) * 60 + minutes + round(seconds / 60)


def _gpus(record: dict[str, str]) -> int:
    """GPUs the job asked for: `--gpus N` is TresPerJob=gres:gpu:N (TresPerNode for `--gres gpu:N`)."""
    found = [
        int(m.group(1))
        for key in ("TresPerJob", "TresPerNode", "TresPerTask")
        if (m := re.search(r"gpu[:=](\d+)", record.get(key, "")))
    ]
    return sum(found)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, model_dir, slurm_env):
    """The paper-shaped config submitted to SLURM, waited for by its test: its jobs mostly wait (on the
    plugin's pause before each submission and its status polls), so the tiny run on SLURM and the local
    shard run (see `tiny_submission`) go on meanwhile. Yields (workspace, config, the judge's requests,
    the submission)."""
    _need_vllm()
    with FakeOpenAI(_judge_reply) as judge:
        config = paper_shaped_config(judge.url)
        work = make_workspace(tmp_path_factory.mktemp("paper"), model_dir, config)
        process = _start(work, slurm_env)
        try:
            yield work, config, judge.requests, process
        finally:
            if process.poll() is None:  # a test failed before waiting for it
                process.kill()
                process.wait()


def test_paper_shaped_config_lands_on_the_partitions_the_plan_dictates(paper_run, slurm_env, capsys):
    """Every stage of config/paper.yaml, submitted through profiles/slurm: per SLURM job, the controller's
    partition, GPUs, CPUs, memory and time limit are the plan's. Model stages on `gpu` with GPUs; the API
    judge, vectors, axis and analyses on `cpu` without; each partition chosen by partitions.yaml."""
    work, config, judge_requests, process = paper_run
    table, slurm, output = _finish(process, slurm_env)
    assert judge_requests, "the judge stage asked the API"

    validated = copy.deepcopy(config)
    validate_config(validated, ROOT / "workflow/schemas/config.schema.yaml")
    plan = Plan.from_config(validated, root=work)
    # How the plugin chose each rule's partition: from profiles/slurm/partitions.yaml, or (no partition there
    # fitting) the cluster's default one, here `cpu` too, which would hide a CPU job the routing failed to place.
    routed = {rule: "partitions.yaml" for rule in re.findall(r"Auto-selected partition '\w+' for job (\w+)", output)}
    routed.update({rule: "default" for rule in re.findall(r"No suitable partition found for job (\w+)", output)})
    rows, problems = [], []
    for slurm_id, job in sorted(slurm.items(), key=lambda kv: int(kv[0])):
        record = _slurm_record(slurm_id, slurm_env)
        rule, role = table[job]
        # The plugin's comment names the rule (and wildcards): the controller's record is this job's.
        assert re.fullmatch(rf"rule_{rule}(_wildcards_.*)?", record["Comment"]), (slurm_id, record["Comment"], rule)
        stage = re.sub(r"_shard\d+$", "", rule)
        resources, gpus = plan.jobs.resources(stage), plan.jobs.gpus(stage)
        got = {
            "partition": record["Partition"],
            "gpus": _gpus(record),
            "cpus": int(record["NumCPUs"]),
            "mem_mb": _megabytes(record["MinMemoryNode"]),
            "runtime": _minutes(record["TimeLimit"]),
        }
        want = {
            "partition": "gpu" if gpus else "cpu",
            "gpus": gpus,
            "cpus": plan.jobs.threads(stage, RULE_THREADS.get(stage, 1)),
            "mem_mb": resources["mem_mb"](None, 1),
            "runtime": resources["runtime"](None, 1),
        }
        rows.append(
            {
                "job": f"{rule}[{role}]" if role else rule,
                "rule": rule,
                "stage": stage,
                "slurm": slurm_id,
                "state": record["JobState"],
                **got,
                "chosen by": routed.get(rule, "?"),
            }
        )
        if record["JobState"] != "COMPLETED" or got != want:
            problems.append(f"{rule} (SLURM job {slurm_id}, {record['JobState']}): got {got}, the plan says {want}")
    with capsys.disabled():
        print("\njob                         slurm id  state      partition  gpus  cpus  mem_mb  runtime  chosen by")
        for r in rows:
            print(
                f"{r['job']:27} {r['slurm']:>8}  {r['state']:10} {r['partition']:9} {r['gpus']:>5} {r['cpus']:>5} "
                f"{r['mem_mb']:>7} {r['runtime']:>8}  {r['chosen by']}"
            )
    assert not problems, "\n".join(problems)

    assert sorted(r["stage"] for r in rows) == sorted(
        [
            "prepare_model",
            "generate",
            "activations",
            *["judge"] * len(TINY_ROLES),
            *["vectors"] * (len(TINY_ROLES) + 1),
            "axis",
            "pca",
            "stability",
            "calibrate",
            "evaluate",
            "drift",
        ]
    )
    assert {r["job"] for r in rows} >= {"generate_shard0", "activations_shard0"}
    assert {r["stage"] for r in rows if r["partition"] == "gpu"} == MODEL_STAGES_ON_GPU
    assert {r["stage"] for r in rows if r["partition"] == "cpu"} == CPU_STAGES
    assert all(r["gpus"] > 0 for r in rows if r["partition"] == "gpu")
    assert all(r["gpus"] == 0 for r in rows if r["partition"] == "cpu")
    unrouted = sorted({r["rule"] for r in rows if r["chosen by"] != "partitions.yaml"})
    assert not unrouted, (
        f"profiles/slurm/partitions.yaml chose no partition for {unrouted}: the plugin fell back "
        "to the cluster's default partition"
    )
