"""Capability prompts with automatic checks: does an intervention cost the model what it could do?

Each prompt of `data/evaluation/capability.jsonl` carries a list of checks, all of which a reply must pass:
an `answer` (arithmetic, facts) matched as whole words after normalisation, so "12" is not found in
"112" or "12.5", and IFEval-style constraints on the form of the reply (word and line counts, case,
commas, how it starts and ends, words it must or must not use).

>>> items = load_capability("data/evaluation/capability.jsonl")
>>> passes("The answer is 1,024.", items[0].checks)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from assistant_axis.artifacts import read_jsonl
from assistant_axis.errors import InputError

__all__ = ["CapabilityItem", "load_capability", "passes", "normalise", "CHECKS"]

# Check type -> its fields (beyond "type"): required, then optional. Counts take min and/or max.
CHECKS = {
    "answer": (("answers",), ()),
    "word_count": ((), ("min", "max")),
    "lines": ((), ("min", "max")),
    "no_commas": ((), ()),
    "lowercase": ((), ()),
    "uppercase": ((), ()),
    "starts_with": (("text",), ()),
    "ends_with": (("text",), ()),
    "includes": (("words",), ()),
    "excludes": (("words",), ()),
}
_QUOTES = "\"'`“”‘’*"
_WORD = re.compile(r"[a-z0-9]+(?:[.'’-][a-z0-9]+)*")


@dataclass(frozen=True)
class CapabilityItem:
    id: str
    category: str
    prompt: str
    checks: tuple[dict, ...]


def normalise(text: str) -> list[str]:
    """The words of `text`, lowercased: thousands separators dropped ("1,000" -> "1000"), possessive 's dropped,
    other punctuation a word boundary except inside a word or number ("12.5", "don't", "forty-two" stay whole)."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    text = re.sub(r"(?<=[a-z])['’]s\b", "", text)  # "Shakespeare's" names Shakespeare
    return _WORD.findall(text)


def _contains(words: list[str], phrase: str) -> bool:
    target = normalise(phrase)
    n = len(target)
    return n > 0 and any(words[i : i + n] == target for i in range(len(words) - n + 1))


def _within(value: int, check: dict) -> bool:
    return check.get("min", value) <= value <= check.get("max", value)


def _passes(reply: str, check: dict) -> bool:
    kind = check["type"]
    words = normalise(reply)
    if kind == "answer":
        return any(_contains(words, answer) for answer in check["answers"])
    if kind == "word_count":
        return _within(len(reply.split()), check)
    if kind == "lines":
        return _within(sum(1 for line in reply.splitlines() if line.strip()), check)
    if kind == "no_commas":
        return "," not in reply
    if kind == "lowercase":
        return reply == reply.lower()
    if kind == "uppercase":
        return reply == reply.upper()
    if kind == "starts_with":
        return reply.strip().lstrip(_QUOTES).lower().startswith(check["text"].lower())
    if kind == "ends_with":
        return reply.strip().rstrip(_QUOTES + ".!?").rstrip().lower().endswith(check["text"].lower())
    if kind == "includes":
        return all(_contains(words, w) for w in check["words"])
    if kind == "excludes":
        return not any(_contains(words, w) for w in check["words"])
    raise ValueError(f"unknown check {kind!r}")


def passes(reply: str, checks) -> bool:
    """Whether `reply` passes every check (an empty reply passes none)."""
    return bool(reply.strip()) and all(_passes(reply, check) for check in checks)


def _check_error(check) -> str | None:
    if not isinstance(check, dict) or check.get("type") not in CHECKS:
        return f"each check needs a type among {', '.join(CHECKS)}"
    required, optional = CHECKS[check["type"]]
    extra = set(check) - {"type", *required, *optional}
    if extra:
        return f"{check['type']} check has unknown fields {sorted(extra)}"
    for name in required:
        value = check.get(name)
        strings = value if isinstance(value, list) else [value]
        if not value or not all(isinstance(s, str) and s.strip() for s in strings):
            return f"{check['type']} check needs a non-empty {name}"
    if optional:
        bounds = [check[b] for b in optional if b in check]
        if not bounds or not all(isinstance(b, int) and b >= 0 for b in bounds):
            return f"{check['type']} check needs a min and/or max count"
        if check.get("min", 0) > check.get("max", check.get("min", 0)):
            return f"{check['type']} check has min > max"
    return None


def load_capability(path: str | Path) -> list[CapabilityItem]:
    """Read and check the capability prompts: one JSON object a line, with id, category, prompt, checks."""
    items = []
    for where, row in read_jsonl(path, ("id", "category", "prompt")):
        checks = row.get("checks")
        if not isinstance(checks, list) or not checks:
            raise InputError(where, "checks", "expected a non-empty list of checks")
        for i, check in enumerate(checks):
            if error := _check_error(check):
                raise InputError(where, f"checks[{i}]", error)
        items.append(CapabilityItem(row["id"], row["category"], row["prompt"], tuple(checks)))
    if not items:
        raise InputError(path, "checks", "no capability prompts")
    return items
