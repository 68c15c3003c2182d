"""The role and question bank: lint counts, one-line errors for bad files, and the paper's layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from assistant_axis.errors import InputError
from assistant_axis.roles import (
    FAMILIES,
    Role,
    load_bank,
    load_paper_questions,
    load_paper_role,
    load_questions,
    load_role,
)

ROOT = Path(__file__).resolve().parents[1]
GOOD = {
    "name": "lighthouse_keeper",
    "family": "archetype",
    "description": "A keeper of a lonely lighthouse.",
    "prompts": [f"You are a lighthouse keeper, variant {i}." for i in range(5)],
}


def test_bank_is_at_paper_scale():
    bank = load_bank(ROOT / "data/roles")
    roles = [r for r in bank.values() if not r.is_default]
    assert len(roles) >= 275
    for family in FAMILIES:
        assert sum(r.family == family for r in roles) >= 30, family
    assert all(len(r.prompts) == 5 for r in bank.values())
    default = bank["default"]
    assert "" in default.prompts and any("{model_name}" in p for p in default.prompts)
    questions = load_questions(ROOT / "data/questions/questions.jsonl")
    assert len(questions) == 240 and len({q.id for q in questions}) == 240


def test_lint_command_prints_counts():
    out = subprocess.run(
        [sys.executable, "-m", "assistant_axis.cli", "lint"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "questions: 240" in out and "5 prompts: " in out
    total = int(out.splitlines()[0].split()[1])
    assert total >= 275


def _write_role(folder: Path, data: dict, stem: str | None = None) -> Path:
    path = folder / f"{stem or data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("edit", "field", "message"),
    [
        (lambda d: d.pop("description"), "description", "missing"),
        (lambda d: d.update(prompts=d["prompts"][:4]), "prompts", "expected exactly 5 prompts, found 4"),
        (lambda d: d["prompts"].__setitem__(2, "   "), "prompts[2]", "empty prompt"),
        (lambda d: d.update(family="wizardry"), "family", "unknown family 'wizardry'"),
        (lambda d: d["prompts"].__setitem__(3, d["prompts"][0]), "prompts[3]", "duplicate of an earlier prompt"),
        (lambda d: d.update(name="Lighthouse Keeper"), "name", "does not match the file name"),
        (lambda d: d.update(colour="blue"), "colour", "unknown field"),
    ],
)
def test_bad_role_file_gets_one_line(tmp_path, edit, field, message):
    data = json.loads(json.dumps(GOOD))
    edit(data)
    path = _write_role(tmp_path, data, stem="lighthouse_keeper")
    with pytest.raises(InputError) as info:
        load_role(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {field}: ") and message in text


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nprompts: [unclosed\n")
    with pytest.raises(InputError, match=r"broken\.yaml: line \d+: not valid YAML"):
        load_role(path)


def test_duplicate_and_near_duplicate_names_in_bank(tmp_path):
    bank = tmp_path / "roles"
    bank.mkdir()
    _write_role(bank, {**yaml.safe_load((ROOT / "data/roles/default.yaml").read_text())})
    _write_role(bank, GOOD)
    other = {**GOOD, "name": "lighthouse_keeper_old", "prompts": [f"Keeper {i}" for i in range(5)]}
    _write_role(bank, other)
    with pytest.raises(InputError, match="lighthouse_keeper_old.yaml: name: .* near-duplicate of 'lighthouse_keeper'"):
        load_bank(bank)
    (bank / "lighthouse_keeper_old.yaml").unlink()
    (bank / "lighthouse_keeper.yml").write_text((bank / "lighthouse_keeper.yaml").read_text())
    with pytest.raises(InputError, match=r"lighthouse_keeper.yml: name: duplicate role name 'lighthouse_keeper'"):
        load_bank(bank)


def test_duplicate_question_id(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "q1", "question": "Who are you?"}\n{"id": "q1", "question": "What do you want?"}\n')
    with pytest.raises(InputError) as info:
        load_questions(path)
    assert str(info.value) == f"{path}: line 2: id: duplicate question id 'q1'"


def test_paper_layout_reads_into_our_objects():
    folder = ROOT / "tests/data/paper_layout"
    role = load_paper_role(folder / "roles/lighthouse_keeper.json")
    assert isinstance(role, Role)
    assert role.name == "lighthouse_keeper" and len(role.prompts) == 5
    assert role.prompts[0] == "You are a lighthouse keeper on a remote rock. Answer as yourself."
    assert "{response}" in role.judge_prompt and "{answer}" not in role.judge_prompt
    questions = load_paper_questions(folder / "questions.jsonl")
    assert [q.id for q in questions] == ["0", "1"]
    assert questions[1].question == "How do you treat people who lie to you?"
    # The same role written in our layout loads into an equal object (source paths aside).
    ours = Role(role.name, role.family, role.description, role.prompts, role.judge_prompt)
    assert ours == role


def test_paper_layout_bad_instruction(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"instruction": [{"neg": "x"}], "eval_prompt": "e"}))
    with pytest.raises(InputError, match=r"bad\.json: instruction\[0\]\.pos: missing or empty"):
        load_paper_role(path)
