"""Building a small copy of the workflow in a temporary folder and running Snakemake on it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TINY_ROLES = ["accountant", "pirate", "ghost"]
# The axis and the stages that read it: a change to the axis reruns all of them.
AXIS_AND_AFTER = ("axis", "pca", "stability", "calibrate", "evaluate", "drift")


def tiny_config(**overrides) -> dict:
    """3 roles + default, 2 prompts, 2 questions, 16 tokens: the whole DAG in about a minute."""
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config["roles"].update(include=list(TINY_ROLES), n_prompts=2)
    config["questions"]["n_questions"] = 2
    config["generate"].update(max_tokens=16, batch_size=8)
    # Plumbing test: 4 replies of 16 tokens rarely all score 3, so every scored reply counts.
    config["vectors"].update(min_score=1, min_count=1)
    config["capping"] = {"ranges": {"late": [0.70, 0.85]}, "percentiles": [25]}
    config["evaluate"] = {
        "n_prompts": 1,
        "max_tokens": 16,
        "sweep": {"bootstrap": 200},
        "drift": {"n_scenarios": 1, "max_turns": 2, "settings": ["late-p25"]},
    }
    config["analysis"] = {"stability": {"sizes": [1, 2], "repeats": 2}}
    for key, value in overrides.items():
        config.setdefault(key, {}).update(value)
    return config


def make_workspace(path: Path, model_dir: Path, config: dict | None = None, bank: list[str] | None = None) -> Path:
    """Copy the workflow and a role bank (default: the tiny roles) into `path`; reuse the converted model.

    `bank=["*"]` copies every role of data/roles.
    """
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "Snakefile", path / "Snakefile")
    shutil.copytree(
        ROOT / "workflow", path / "workflow", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    (path / "data/roles").mkdir(parents=True, exist_ok=True)
    (path / "data/questions").mkdir(parents=True, exist_ok=True)
    names = [p.stem for p in (ROOT / "data/roles").glob("*.yaml")] if bank == ["*"] else (bank or TINY_ROLES)
    for role in {*names, "default"}:
        shutil.copy(ROOT / f"data/roles/{role}.yaml", path / f"data/roles/{role}.yaml")
    shutil.copy(ROOT / "data/questions/questions.jsonl", path / "data/questions/questions.jsonl")
    shutil.copytree(ROOT / "data/evaluation", path / "data/evaluation", dirs_exist_ok=True)
    config = config or tiny_config()
    (path / "config").mkdir(exist_ok=True)
    (path / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    models = path / "results/models"
    models.mkdir(parents=True, exist_ok=True)
    link = models / config["model"]["name"]
    if not link.exists():
        link.symlink_to(model_dir, target_is_directory=True)
    return path


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a finished workspace that Snakemake sees as finished too: timestamps and `.snakemake/` kept
    (not its locks or incomplete markers). Its `model.json` names the model folder relative to the workspace,
    so the copy loads its own (here a link, as in `make_workspace`)."""
    shutil.copytree(run, dest, symlinks=True, ignore=shutil.ignore_patterns("locks", "incomplete"))
    return dest


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*SNAKEMAKE, "--cores", "2", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def planned_jobs(workdir: Path, *args: str) -> set[tuple[str, str | None]]:
    """(rule, role) of every job a dry run would execute."""
    out = snakemake(workdir, "-n", *args).stdout
    jobs, rule = set(), None
    for line in out.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):", line)
        if match:
            if rule:
                jobs.add((rule, None))
            rule = match.group(1)
            continue
        wildcards = re.match(r"^\s+wildcards: (.*)", line)
        if wildcards and rule:
            role = dict(kv.split("=", 1) for kv in wildcards.group(1).split(", ")).get("role")
            jobs.add((rule, role))
            rule = None
    if rule:
        jobs.add((rule, None))
    return jobs
