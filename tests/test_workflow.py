"""End to end: the tiny config through Snakemake on the bundled model, then the rerun rules."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from assistant_axis.axis import load_axis
from assistant_axis.stages import OPTIONAL_RESPONSE_COLUMNS, RESPONSE_COLUMNS, SCORE_COLUMNS

from workflow_helpers import AXIS_AND_AFTER, TINY_ROLES, copy_run, planned_jobs, snakemake

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow


@pytest.fixture
def run(tiny_run):
    return tiny_run


def test_every_artifact_has_its_shape_and_keys(run):
    results = run / "results" / MODEL
    for role in [*TINY_ROLES, "default"]:
        responses = pd.read_parquet(results / f"responses/{role}.parquet")
        assert list(responses.columns) == [*RESPONSE_COLUMNS, *OPTIONAL_RESPONSE_COLUMNS]
        assert len(responses) == 4 and set(responses["role"]) == {role}
        pairs = sorted(zip(responses.prompt_index, responses.question_index, strict=True))
        assert pairs == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert responses["n_response_tokens"].between(0, 16).all()
        assert set(responses["finish_reason"]) <= {"stop", "length"}
        acts = load_file(results / f"activations/{role}.safetensors")
        assert acts["activations"].shape == (4, 30, 576) and acts["activations"].dtype == torch.float32
        assert acts["layers"].tolist() == list(range(30))
        vector = load_file(results / f"vectors/{role}.safetensors")
        assert vector["vector"].shape == (30, 576)
    for role in TINY_ROLES:
        scores = pd.read_parquet(results / f"scores/{role}.parquet")
        assert list(scores.columns) == list(SCORE_COLUMNS) and len(scores) == 4
        assert str(scores["score"].dtype) == "Int64"
        assert scores["judge"].str.startswith("embedding-heuristic").all()
    assert not (results / "scores/default.parquet").exists()
    # How the replies were rendered travels from the activations through the vectors to the axis.
    from assistant_axis.artifacts import read_tensors

    rendered = {
        read_tensors(results / f"{kind}/{role}.safetensors", [])[1]["chat_template_kwargs"]
        for kind in ("activations", "vectors")
        for role in [*TINY_ROLES, "default"]
    }
    axis_meta = read_tensors(results / "axis.safetensors", ["axis"])[1]
    assert rendered == {"{}"} and axis_meta["chat_template_kwargs"] == "{}" and axis_meta["chat_template_sha"]
    summary = pd.read_parquet(results / "vectors/summary.parquet")
    assert set(summary["role"]) == {*TINY_ROLES, "default"}
    axis, layers, meta = load_axis(results / "axis.safetensors")
    assert axis.shape == (30, 576) and torch.isfinite(axis).all() and axis.norm() > 0
    assert layers == list(range(30)) and meta["model"] == MODEL
    assert set(meta["roles"]) == set(summary[summary.included & (summary.role != "default")]["role"])
    plain = torch.load(results / "axis.pt", weights_only=True)
    assert torch.equal(plain, axis)


def test_axis_matches_the_definition(run):
    results = run / "results" / MODEL
    summary = pd.read_parquet(results / "vectors/summary.parquet")
    used = summary[summary.included & (summary.role != "default")]["role"]
    default = load_file(results / "vectors/default.safetensors")["vector"]
    roles = torch.stack([load_file(results / f"vectors/{r}.safetensors")["vector"] for r in used])
    axis, _, _ = load_axis(results / "axis.safetensors")
    torch.testing.assert_close(axis, default - roles.mean(0))


def _edit_yaml(path, edit):
    original = path.read_text()
    data = yaml.safe_load(original)
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return original


def test_nothing_changed_nothing_to_do(run):
    assert planned_jobs(run) == set()


AFTER_AXIS = {(stage, None) for stage in (*AXIS_AND_AFTER, "all")}


def test_a_reformatted_config_reruns_nothing(run):
    """Keys sorted, a default written out, `1` for `1.0`: the same config, so nothing reruns."""
    path = run / "config/config.yaml"
    original = path.read_text()
    data = yaml.safe_load(original)
    data["model"]["gpus"] = 0  # the schema's default, now spelled out
    data["evaluate"]["top_p"] = 1  # the default 1.0, as an integer
    path.write_text(yaml.safe_dump(data, sort_keys=True))
    try:
        assert list(yaml.safe_load(path.read_text())) != list(yaml.safe_load(original))  # really reordered
        assert planned_jobs(run) == set()
    finally:
        path.write_text(original)


def test_a_sampling_edit_reruns_everything_from_generate_on(run):
    path = run / "config/config.yaml"
    original = _edit_yaml(path, lambda d: d["generate"].update(temperature=0.5))
    try:
        every = [*TINY_ROLES, "default"]
        assert planned_jobs(run) == (
            {(stage, r) for stage in ("generate", "activations", "vectors") for r in every}
            | {("judge", r) for r in TINY_ROLES}
            | AFTER_AXIS
        )
    finally:
        path.write_text(original)


def test_edits_after_the_axis_rerun_only_what_follows_them(run):
    """The axis records the config that made it, not the sections that only read it."""
    path = run / "config/config.yaml"
    original = _edit_yaml(path, lambda d: d["evaluate"].update(n_prompts=2))
    try:
        assert planned_jobs(run) == {("evaluate", None), ("all", None)}
    finally:
        path.write_text(original)
    original = _edit_yaml(path, lambda d: d.setdefault("capping", {}).update(percentiles=[25, 10]))
    try:
        assert planned_jobs(run) == {("calibrate", None), ("evaluate", None), ("drift", None), ("all", None)}
    finally:
        path.write_text(original)
    original = _edit_yaml(path, lambda d: d["evaluate"]["drift"].update(last_turns=1))
    try:
        assert planned_jobs(run) == {("drift", None), ("all", None)}
    finally:
        path.write_text(original)


def test_description_edit_reruns_only_that_roles_judge_chain(run):
    path = run / "data/roles/pirate.yaml"
    original = _edit_yaml(path, lambda d: d.update(description=d["description"] + " Speaks of the sea."))
    try:
        assert planned_jobs(run) == {("judge", "pirate"), ("vectors", "pirate"), *AFTER_AXIS}
    finally:
        path.write_text(original)


def test_prompt_edit_reruns_only_that_roles_chain(run):
    path = run / "data/roles/ghost.yaml"
    original = _edit_yaml(path, lambda d: d["prompts"].__setitem__(0, d["prompts"][0] + " Whisper."))
    try:
        assert planned_jobs(run) == {
            ("generate", "ghost"),
            ("activations", "ghost"),
            ("judge", "ghost"),
            ("vectors", "ghost"),
            *AFTER_AXIS,
        }
    finally:
        path.write_text(original)


def test_unused_prompt_edit_reruns_nothing(run):
    path = run / "data/roles/ghost.yaml"  # the tiny config uses the first 2 of 5 prompts
    original = _edit_yaml(path, lambda d: d["prompts"].__setitem__(4, d["prompts"][4] + " Unused."))
    try:
        assert planned_jobs(run) == set()
    finally:
        path.write_text(original)


def test_judge_template_edit_reruns_every_judge_and_nothing_upstream(run):
    path = run / "config/config.yaml"
    original = _edit_yaml(path, lambda d: d["judge"].update(template="Rate {role}: {response}"))
    try:
        expected = {("judge", r) for r in TINY_ROLES} | {("vectors", r) for r in TINY_ROLES}
        assert planned_jobs(run) == expected | AFTER_AXIS
    finally:
        path.write_text(original)


def test_bad_role_file_fails_at_planning_with_one_line(run):
    path = run / "data/roles/pirate.yaml"
    original = _edit_yaml(path, lambda d: d.update(prompts=d["prompts"][:4]))
    try:
        result = snakemake(run, "-n", check=False)
        assert result.returncode != 0
        assert f"{path.relative_to(run)}: prompts: expected exactly 5 prompts, found 4" in result.stderr + result.stdout
    finally:
        path.write_text(original)


def test_paper_config_plans_every_role_of_the_bank(tmp_path):
    """`snakemake -n --configfile config/paper.yaml` plans generate .. vectors for all roles, then the axis."""
    from assistant_axis.roles import load_bank

    from workflow_helpers import ROOT

    bank = [name for name in load_bank(ROOT / "data/roles")]
    result = snakemake(ROOT, "-n", "--configfile", "config/paper.yaml", "--quiet", "rules")
    counts = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    n = len(bank)
    assert counts == {
        "prepare_model": 1,
        "generate": n,
        "activations": n,
        "judge": n - 1,
        "vectors": n,
        "axis": 1,
        "pca": 1,
        "stability": 1,
        "calibrate": 1,
        "evaluate": 1,
        "drift": 1,
        "all": 1,
        "total": 4 * n + 7,
    }
    # The judge's requests, printed at planning, counted from the role and question files themselves.
    from test_cost import paper_config, requests_from_the_files

    judged = requests_from_the_files(paper_config())
    assert judged == (n - 1) * 5 * 240
    assert f"judge: {judged:,} requests to gpt-4.1-mini before the cache ({n - 1} roles x 5 prompts" in result.stderr
    assert "judge cost: at most $" in result.stderr


def test_api_judge_jobs_share_one_request_budget(run, tmp_path):
    """`judge.openai.jobs: 1`: the judge jobs run one at a time even with cores to spare, each sending at
    the whole budget's rate; together they never exceed it."""
    import re
    import threading
    import time

    from fake_openai import FakeOpenAI, completion

    seen: list[tuple[str, float, float]] = []  # (role, start, end) of every request
    lock = threading.Lock()

    def reply(body: dict, auth: str):
        start = time.monotonic()
        time.sleep(0.5)
        role = re.search(r"^Role: (\w+)$", body["messages"][-1]["content"], re.M).group(1)
        with lock:
            seen.append((role, start, time.monotonic()))
        return 200, completion("3", top_logprobs=[("3", -0.1), ("2", -2.5), ("1", -4.0), ("0", -5.0)])

    work = tmp_path / "work"
    copy_run(run, work)
    with FakeOpenAI(reply) as api:
        _edit_yaml(
            work / "config/config.yaml",
            lambda d: d["judge"].update(
                backend="openai",
                openai={
                    "base_url": api.url,
                    "model": "fake",
                    "api_key_env": None,
                    "cache": None,
                    "jobs": 1,
                    "concurrency": 1,
                    "requests_per_second": 50,
                },
            ),
        )
        targets = [f"results/{MODEL}/scores/{role}.parquet" for role in TINY_ROLES]
        snakemake(work, "--cores", "3", *targets)
    windows = {
        role: (min(s for r, s, _ in seen if r == role), max(e for r, _, e in seen if r == role)) for role in TINY_ROLES
    }
    assert len(seen) == 4 * len(TINY_ROLES)
    ordered = sorted(windows.values())
    assert all(end <= next_start for (_, end), (next_start, _) in zip(ordered, ordered[1:], strict=False)), windows
    for role in TINY_ROLES:
        assert pd.read_parquet(work / f"results/{MODEL}/scores/{role}.parquet")["score"].eq(3).all()


def test_a_copied_project_plans_nothing_and_reads_its_own_model(run, tmp_path):
    """Results are relocatable: `model.json` names the model folder relative to the workflow directory. A copy
    (`cp -a`) of a finished project plans nothing, and with the original deleted it reruns a stage on its own
    model: its chat template edited in the copy, the job renders with the copy's."""
    import json
    import os
    import shutil
    import subprocess

    from assistant_axis import stages
    from assistant_axis.artifacts import read_tensors

    a, b = tmp_path / "a", tmp_path / "b"
    copy_run(run, a)
    models = a / "results/models"
    if (models / MODEL).is_symlink():  # the tiny run's model folder is a link: a real copy of it inside A
        shared = (models / MODEL).resolve()
        (models / MODEL).unlink()
        shutil.copytree(shared, models / MODEL)
    manifest = a / f"results/{MODEL}/model.json"
    if not json.loads(manifest.read_text())["path"].startswith("./"):
        # A tiny run made by an older version (AXIS_TINY_RUN) records an absolute path: its manifest as the
        # prepare stage writes it now, its time kept, so that the rest stays finished.
        stat = manifest.stat()
        source = yaml.safe_load((a / "config/config.yaml").read_text())["model"]["source"]
        stages.prepare_model(output=str(manifest), name=MODEL, source=source, models_dir=str(models))
        os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert json.loads(manifest.read_text())["path"] == f"./results/models/{MODEL}"

    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    dry = snakemake(b, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout + dry.stderr
    shutil.rmtree(a)
    template = b / f"results/models/{MODEL}/chat_template.jinja"
    template.write_text(template.read_text() + "{# edited in the copy: renders the same #}")

    target = f"results/{MODEL}/activations/pirate.safetensors"
    snakemake(b, "--force", target)
    log = (b / f"logs/{MODEL}/activations/pirate.log").read_text()
    assert f"model {b.resolve() / 'results/models' / MODEL} loaded" in log, log
    (ours, meta), (theirs, before) = (read_tensors(root / target, ["activations"]) for root in (b, run))
    assert meta["chat_template_sha"] != before["chat_template_sha"]  # the copy's template
    torch.testing.assert_close(ours["activations"], theirs["activations"])
