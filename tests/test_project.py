"""Project hygiene: the rules' conda environment matches pyproject.toml; the configs validate against the schema."""

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


def test_the_conda_environment_matches_pyproject_and_every_rule_uses_it():
    """`--sdm conda` builds workflow/envs/assistant-axis.yaml, then its post-deploy script installs the
    package: the env must pin what pyproject.toml pins, and every rule must name it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    env = yaml.safe_load((ROOT / "workflow/envs/assistant-axis.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {_name(r) for r in pip} == {_name(r) for r in wanted}
    assert set(wanted) - set(pip) == {"torch>=2.4"} and "torch==2.13.0" in pip  # the rest, exactly as pinned
    deploy = (ROOT / "workflow/envs/assistant-axis.post-deploy.sh").read_text()
    assert "pip install --no-deps -e ." in deploy
    for rules in (ROOT / "workflow/rules").glob("*.smk"):
        text = rules.read_text()
        n_rules = len(re.findall(r"^\s*rule\b", text, re.M))
        assert text.count("conda:\n") == text.count('"../envs/assistant-axis.yaml"') == n_rules, rules.name


def test_the_development_environment_installs_this_checkout_as_pyproject_pins_it():
    """environment.yml lists no package of its own beside torch's pin: the checkout's, with its test tools."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == ["torch==2.13.0", "-e .[dev]"]
    workflow_env = yaml.safe_load((ROOT / "workflow/envs/assistant-axis.yaml").read_text())
    assert "torch==2.13.0" in next(d["pip"] for d in workflow_env["dependencies"] if isinstance(d, dict))
    assert "dev" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


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
