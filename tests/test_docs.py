"""The README is a front page: short, linking every page of docs/, and no link in the docs leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower())
    return text.replace(" ", "-")


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_the_readme_is_a_front_page_linking_every_doc():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) < 300
    linked = {(readme.parent / link.partition("#")[0]).resolve() for link in _links(readme)}
    assert set((ROOT / "docs").glob("*.md")) <= linked, "a page of docs/ that the README does not link"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_reaches_its_file_and_heading(page):
    for link in _links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} (no such file)"
        if anchor and target.suffix == ".md":
            headings = {_anchor(line) for line in target.read_text().splitlines() if line.startswith("#")}
            assert anchor in headings, f"{page.name}: {link} (no such heading)"
