"""Project hygiene: environment.yml matches pyproject.toml; the configs validate against the schema."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "workflow/schemas/config.schema.yaml")


def _name(requirement: str) -> str:
    return re.split(r"[<>=\[ ]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip if not r.startswith("-e")}
    assert listed == wanted


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_configs_validate(name):
    config = yaml.safe_load((ROOT / "config" / name).read_text())
    validate(config, SCHEMA)
    assert config["activations"]["layers"] == "all"  # defaults filled in by the schema


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda c: c["generate"].update(max_tokens=-5), "max_tokens"),
        (lambda c: c["generate"].update(backend="magic"), "backend"),
        (lambda c: c["vectors"].update(min_score=5), "min_score"),
        (lambda c: c["model"].update(dtype="int3"), "dtype"),
        (lambda c: c.update(colour="blue"), "colour"),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(edit, key):
    from snakemake.exceptions import WorkflowError

    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    edit(config)
    with pytest.raises(WorkflowError, match=key):
        validate(config, SCHEMA)
