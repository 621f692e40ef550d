"""The documentation's promises that a machine can check: CI runs the README's command, and
every relative link in README.md and docs/ reaches a file and, when it names one, a heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Pages written on other branches at the same time; linked from the index before they are merged.
WRITTEN_ELSEWHERE = {
    "call-session.md",
    "state-and-limits.md",
    "admin-security.md",
    "admin-api.md",
    "real-switch-lab.md",
    "freeswitch.md",
    "accounting.md",
}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_ci_runs_the_command_the_readme_gives() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec bash scripts/test\.sh\b", ci, flags=re.M)
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh     # run the test suite" in readme


def test_the_index_links_every_page_of_docs() -> None:
    index = (ROOT / "docs" / "README.md").read_text()
    linked = set(LINK.findall(index))
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert page.name in linked, f"docs/README.md does not link {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_a_heading(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, mailto: ...
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() and resolved.name in WRITTEN_ELSEWHERE:
            continue
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if fragment and resolved.suffix == ".md":
            assert fragment in anchors(resolved), f"{page.name}: {target}: no such heading"
