"""The role bank and the extraction questions: loading, validation, and the paper's published layout.

Our layout: one YAML file per role in `data/roles/` (`name`, `family`, `description`, 5 `prompts`,
optional `judge_prompt`), `default.yaml` for the plain assistant, and `data/questions/*.jsonl`
with `{"id", "category", "question"}` lines. Every problem is raised as an `InputError` naming the
file and the field.

>>> bank = load_bank("data/roles")
>>> bank["bard"].prompts[0]
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from assistant_axis.errors import InputError

__all__ = [
    "DEFAULT_ROLE",
    "FAMILIES",
    "N_PROMPTS",
    "Role",
    "Question",
    "load_role",
    "load_bank",
    "load_questions",
    "load_paper_role",
    "load_paper_questions",
    "lint",
]

DEFAULT_ROLE = "default"
N_PROMPTS = 5
FAMILIES = ("profession", "caring", "creative", "mystical", "nonhuman", "archetype", "edge")
# Roles read from the paper's layout carry no family of ours.
IMPORTED_FAMILY = "imported"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_ROLE_KEYS = {"name", "family", "description", "prompts", "judge_prompt"}


@dataclass(frozen=True)
class Role:
    name: str
    family: str
    description: str
    prompts: tuple[str, ...]
    judge_prompt: str | None = None
    source: str = field(default="", compare=False)

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_ROLE


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    category: str = ""


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "file"
        raise InputError(path, where, f"not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(data, dict):
        raise InputError(path, "file", "expected a mapping of role fields")
    return data


def _text(path: Path, data: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in data:
        raise InputError(path, key, "missing")
    value = data[key]
    if not isinstance(value, str):
        raise InputError(path, key, f"expected text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InputError(path, key, "empty")
    return value.strip()


def load_role(path: str | Path) -> Role:
    """Load and validate one role file of our layout."""
    path = Path(path)
    data = _read_yaml(path)
    unknown = sorted(set(data) - _ROLE_KEYS)
    if unknown:
        raise InputError(path, unknown[0], f"unknown field (allowed: {', '.join(sorted(_ROLE_KEYS))})")
    name = _text(path, data, "name")
    if name != path.stem:
        raise InputError(path, "name", f"{name!r} does not match the file name {path.stem!r}")
    if not _NAME.match(name):
        raise InputError(path, "name", f"{name!r} is not lowercase snake_case")
    is_default = name == DEFAULT_ROLE
    family = _text(path, data, "family")
    allowed = (DEFAULT_ROLE,) if is_default else FAMILIES
    if family not in allowed:
        raise InputError(path, "family", f"unknown family {family!r} (allowed: {', '.join(allowed)})")
    description = _text(path, data, "description")
    prompts = data.get("prompts")
    if prompts is None:
        raise InputError(path, "prompts", "missing")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InputError(path, "prompts", "expected a list of strings")
    if len(prompts) != N_PROMPTS:
        raise InputError(path, "prompts", f"expected exactly {N_PROMPTS} prompts, found {len(prompts)}")
    for i, prompt in enumerate(prompts):
        # The default role keeps one empty prompt on purpose: the model with no system prompt at all.
        if not prompt.strip() and not is_default:
            raise InputError(path, f"prompts[{i}]", "empty prompt")
        unknown_placeholder = next((m for m in re.findall(r"\{\w*\}", prompt) if m != "{model_name}"), None)
        if unknown_placeholder:  # it would reach the model verbatim
            raise InputError(
                path, f"prompts[{i}]", f"unknown placeholder {unknown_placeholder} (only {{model_name}} is filled in)"
            )
    stripped = [p.strip() for p in prompts]
    dup = next((i for i, p in enumerate(stripped) if stripped.index(p) != i), None)
    if dup is not None:
        raise InputError(path, f"prompts[{dup}]", "duplicate of an earlier prompt")
    judge_prompt = data.get("judge_prompt")
    if judge_prompt is not None:
        judge_prompt = _text(path, data, "judge_prompt")
    return Role(name, family, description, tuple(stripped), judge_prompt, str(path))


def load_bank(directory: str | Path) -> dict[str, Role]:
    """Load every `*.yaml` role in `directory`; the `default` role must be among them."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "roles.bank", "no such directory")
    roles: dict[str, Role] = {}
    seen_prompts: dict[str, str] = {}
    for path in sorted(directory.glob("*.y*ml")):
        role = load_role(path)
        if role.name in roles:
            raise InputError(path, "name", f"duplicate role name {role.name!r}")
        for i, prompt in enumerate(role.prompts):
            if prompt and prompt in seen_prompts:
                raise InputError(path, f"prompts[{i}]", f"same prompt as role {seen_prompts[prompt]!r}")
            seen_prompts[prompt] = role.name
        roles[role.name] = role
    if DEFAULT_ROLE not in roles:
        raise InputError(directory, DEFAULT_ROLE, "the bank has no default.yaml")
    for a, b in itertools.combinations(sorted(roles), 2):
        if near_duplicate(a, b):
            raise InputError(roles[b].source, "name", f"{b!r} is a near-duplicate of {a!r}")
    return roles


def near_duplicate(a: str, b: str) -> bool:
    """Names that differ by a word (`poet`, `poet_laureate`) or by a few letters (`poet`, `poets`)."""
    words_a, words_b = set(a.split("_")), set(b.split("_"))
    if words_a < words_b or words_b < words_a:
        return True
    return difflib.SequenceMatcher(None, a.replace("_", ""), b.replace("_", "")).ratio() >= 0.9


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise InputError(path, "file", "no such file")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"line {lineno}", f"not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise InputError(path, f"line {lineno}", "expected a JSON object")
        rows.append((lineno, row))
    return rows


def _questions(path: Path, rows: list[tuple[int, dict]], *, id_key: str) -> list[Question]:
    questions: list[Question] = []
    ids: set[str] = set()
    texts: set[str] = set()
    for lineno, row in rows:
        qid, text = row.get(id_key), row.get("question")
        if qid is None or str(qid).strip() == "":
            raise InputError(path, f"line {lineno}: {id_key}", "missing")
        if not isinstance(text, str) or not text.strip():
            raise InputError(path, f"line {lineno}: question", "missing or empty")
        qid = str(qid)
        if qid in ids:
            raise InputError(path, f"line {lineno}: {id_key}", f"duplicate question id {qid!r}")
        if text.strip().lower() in texts:
            raise InputError(path, f"line {lineno}: question", "duplicate question text")
        ids.add(qid)
        texts.add(text.strip().lower())
        questions.append(Question(qid, text.strip(), str(row.get("category", ""))))
    if not questions:
        raise InputError(path, "file", "no questions")
    return questions


def load_questions(path: str | Path) -> list[Question]:
    """Load our questions file: JSON Lines of `{"id", "category", "question"}`."""
    path = Path(path)
    return _questions(path, _jsonl(path), id_key="id")


def load_paper_role(path: str | Path) -> Role:
    """Read a role in the paper repository's layout: `{"instruction": [{"pos": ...}], "eval_prompt": ...}`.

    The `pos` instructions become the system prompts; `eval_prompt` becomes the role's judge prompt
    (its `{answer}` placeholder renamed to our `{response}`) and, lacking a separate description, the
    text the judge reads.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, "file", f"not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise InputError(path, "file", "expected a JSON object")
    instructions = data.get("instruction")
    if not isinstance(instructions, list) or not instructions:
        raise InputError(path, "instruction", "missing or not a list")
    prompts = []
    for i, item in enumerate(instructions):
        if not isinstance(item, dict) or not isinstance(item.get("pos"), str) or not item["pos"].strip():
            raise InputError(path, f"instruction[{i}].pos", "missing or empty")
        prompts.append(item["pos"].strip())
    eval_prompt = data.get("eval_prompt")
    if not isinstance(eval_prompt, str) or not eval_prompt.strip():
        raise InputError(path, "eval_prompt", "missing or empty")
    judge_prompt = eval_prompt.strip().replace("{answer}", "{response}")
    name = path.stem
    if not _NAME.match(name):
        raise InputError(path, "name", f"{name!r} is not lowercase snake_case")
    family = DEFAULT_ROLE if name == DEFAULT_ROLE else IMPORTED_FAMILY
    return Role(name, family, eval_prompt.strip(), tuple(prompts), judge_prompt, str(path))


def load_paper_questions(path: str | Path) -> list[Question]:
    """Read questions in the paper's layout: `{"question": ..., "id": ...}` lines."""
    path = Path(path)
    return _questions(path, _jsonl(path), id_key="id")


def lint(roles_dir: str | Path, questions_file: str | Path) -> str:
    """Validate the bank and the questions; return a short report of counts (raises on the first problem)."""
    bank = load_bank(roles_dir)
    questions = load_questions(questions_file)
    roles = [r for r in bank.values() if not r.is_default]
    families = Counter(r.family for r in roles)
    lines = [f"roles: {len(roles)} (+ default)"]
    lines += [f"  {family:<11} {families.get(family, 0)}" for family in FAMILIES]
    per_role = Counter(len(r.prompts) for r in bank.values())
    lines.append("prompts per role: " + ", ".join(f"{n} prompts: {c} roles" for n, c in sorted(per_role.items())))
    lines.append(f"questions: {len(questions)}")
    categories = Counter(q.category for q in questions)
    lines += [f"  {cat or '(none)':<11} {n}" for cat, n in sorted(categories.items())]
    return "\n".join(lines)


def stable_seed(*parts: object) -> int:
    """A seed derived from names (stable across processes, unlike `hash`)."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode()) & 0x7FFFFFFF
