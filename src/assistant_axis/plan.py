"""What the workflow runs, decided at DAG-build time from the validated config.

Each stage gets only the data it uses as Snakemake `params`, so Snakemake's params trigger reruns
exactly what an edit affects: a role's prompts feed its generation, its description feeds its judging.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from assistant_axis.errors import InputError
from assistant_axis.judge import DEFAULT_TEMPLATE
from assistant_axis.roles import (
    DEFAULT_ROLE,
    Question,
    Role,
    load_bank,
    load_paper_questions,
    load_paper_role,
    load_questions,
)

__all__ = ["Plan"]


def _load_roles(bank: Path, layout: str) -> dict[str, Role]:
    if layout == "paper":
        roles = {p.stem: load_paper_role(p) for p in sorted(bank.glob("*.json"))}
        if DEFAULT_ROLE not in roles:
            raise InputError(bank, DEFAULT_ROLE, "the bank has no default.json")
        return roles
    return load_bank(bank)


@dataclass
class Plan:
    config: dict
    roles: dict[str, Role]  # the selected roles, `default` included
    questions: list[Question]

    @classmethod
    def from_config(cls, config: dict, root: str | Path = ".") -> Plan:
        root = Path(root)
        layout = config["roles"].get("layout", "ours")
        bank = _load_roles(root / config["roles"]["bank"], layout)
        include = config["roles"]["include"]
        names = sorted(n for n in bank if n != DEFAULT_ROLE) if include == "all" else list(include)
        for name in names:
            if name not in bank:
                raise InputError("config", "roles.include", f"no role {name!r} in {config['roles']['bank']}")
        if len(set(names)) != len(names):
            raise InputError("config", "roles.include", "a role is listed twice")
        roles = {DEFAULT_ROLE: bank[DEFAULT_ROLE], **{n: bank[n] for n in names if n != DEFAULT_ROLE}}
        qfile = root / config["questions"]["file"]
        questions = load_paper_questions(qfile) if layout == "paper" else load_questions(qfile)
        n_questions = config["questions"].get("n_questions")
        if n_questions is not None:
            if n_questions > len(questions):
                raise InputError("config", "questions.n_questions",
                                 f"{n_questions} requested but {qfile} has {len(questions)}")
            questions = questions[:n_questions]
        return cls(config, roles, questions)

    @property
    def model(self) -> str:
        return self.config["model"]["name"]

    @property
    def role_names(self) -> list[str]:
        return list(self.roles)

    def system_prompts(self, role: str) -> list[str]:
        """The role's first `n_prompts` prompts, with `{model_name}` filled in."""
        display = self.config["model"].get("display_name") or self.model
        n = self.config["roles"]["n_prompts"]
        return [p.replace("{model_name}", display) for p in self.roles[role].prompts[:n]]

    def question_params(self) -> list[dict]:
        return [{"id": q.id, "question": q.question} for q in self.questions]

    def judge_params(self, role: str) -> dict:
        r = self.roles[role]
        judge = self.config["judge"]
        return {
            "role": r.name,
            "description": r.description,
            "template": r.judge_prompt or judge.get("template") or DEFAULT_TEMPLATE,
            "backend": judge["backend"],
            "settings": judge.get(judge["backend"], {}),
        }

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True, default=str).encode()).hexdigest()[:16]
