"""The README as a first page: small, its table of choices equal to the registry, and every relative
link in it and in docs/ pointing at a file (and heading) that exists, committed or not (tests/test_docs.py
checks the tracked files)."""

import re
from pathlib import Path

import pytest

from dream3d import registry
from tests.test_docs import MARKDOWN_LINK, broken_target

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_BYTES = 15_000


def choices_table(text: str) -> dict[str, tuple[str, ...]]:
    """The names of the README's "What you can choose" table, by kind, in table order."""
    section = text.split("## What you can choose", 1)[1].split("\n## ", 1)[0]
    names: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1].startswith("`") and cells[1].endswith("`"):
            names.setdefault(cells[0], []).append(cells[1].strip("`"))
    return {kind: tuple(found) for kind, found in names.items()}


def broken_links(page: Path) -> list[str]:
    """The relative links of a Markdown page whose file or heading does not exist."""
    broken = []
    for link in MARKDOWN_LINK.findall(page.read_text()):
        name, _, anchor = link.partition("#")
        if not re.match(r"[a-z]+:", link) and broken_target(page.parent / name if name else page, anchor or None):
            broken.append(link)
    return broken


def test_the_readme_fits_on_a_first_page():
    assert README.stat().st_size <= MAX_README_BYTES


def test_the_choices_table_is_the_registry():
    table = choices_table(README.read_text())
    assert table == {
        "rule": registry.RULES.names,
        "prior": registry.PRIORS.names,
        "representation": registry.REPRESENTATIONS.names,
    }


def test_the_table_parser_sees_a_missing_row():
    text = README.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| rule | `nfsd` |"))
    assert "nfsd" not in choices_table(text.replace(row + "\n", ""))["rule"]


def test_the_readme_opens_with_pictures_that_exist():
    intro = README.read_text().split("\n## ", 1)[0]
    pictures = [link for link in MARKDOWN_LINK.findall(intro) if link.startswith("docs/images/")]
    assert len(pictures) >= 3
    assert all((ROOT / target).is_file() for target in pictures)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_a_link_to_a_missing_heading_is_broken(tmp_path):
    (tmp_path / "other.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading) [gone](other.md#no-such) [none](missing.md) [web](https://example.com)\n")
    assert broken_links(page) == ["other.md#no-such", "missing.md"]
