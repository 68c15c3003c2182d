"""The roles and questions a config selects from the bank: `default` first, then the included roles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from assistant_axis.errors import InputError
from assistant_axis.roles import (
    DEFAULT_ROLE,
    Question,
    Role,
    load_bank,
    load_paper_questions,
    load_paper_role,
    load_questions,
)

__all__ = ["Bank", "select_bank"]


@dataclass
class Bank:
    roles: dict[str, Role]  # the selected roles, `default` included (first)
    questions: list[Question]
    n_prompts: int
    display_name: str  # fills `{model_name}` in the prompts

    def system_prompts(self, role: str) -> list[str]:
        """The role's first `n_prompts` prompts, with `{model_name}` filled in."""
        return [p.replace("{model_name}", self.display_name) for p in self.roles[role].prompts[: self.n_prompts]]

    @property
    def n_responses(self) -> int:
        return sum(len(self.system_prompts(r)) for r in self.roles) * len(self.questions)


def _load_roles(bank: Path, layout: str) -> dict[str, Role]:
    if layout == "paper":
        roles = {p.stem: load_paper_role(p) for p in sorted(bank.glob("*.json"))}
        if DEFAULT_ROLE not in roles:
            raise InputError(bank, DEFAULT_ROLE, "the bank has no default.json")
        return roles
    return load_bank(bank)


def select_bank(config: dict, root: str | Path = ".") -> Bank:
    """The roles (`roles.include`, checked against the bank) and the first `questions.n_questions` questions."""
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
            raise InputError(
                "config", "questions.n_questions", f"{n_questions} requested but {qfile} has {len(questions)}"
            )
        questions = questions[:n_questions]
    display = config["model"].get("display_name") or config["model"]["name"]
    return Bank(roles, questions, config["roles"]["n_prompts"], display)
