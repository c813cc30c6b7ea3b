"""The documentation site (``make docs``, mkdocs.yml): every page in docs/
is listed in ``nav``, and every page ``nav`` lists exists, so a new page
cannot be forgotten. ``mkdocs build --strict`` checks the same and the
links; this test runs without mkdocs installed (the nox matrix has no docs
extra) and in milliseconds."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def nav_pages() -> list[str]:
    """The ``.md`` entries of mkdocs.yml's ``nav:`` block, in order (read as
    text: PyYAML comes only with the docs extra)."""
    text = (ROOT / "mkdocs.yml").read_text()
    block = re.search(r"^nav:\n((?:[ \t]+.*\n?|\n)*)", text, re.M)
    assert block is not None, "mkdocs.yml has no nav: block"
    return re.findall(r"^\s*-\s*(?:[^\n:]+:\s*)?([\w./-]+\.md)\s*$", block.group(1), re.M)


def test_nav_lists_every_page_once_and_only_pages_that_exist():
    pages = nav_pages()
    assert pages, "no pages found in nav: has the pattern broken?"
    on_disk = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    missing = sorted(set(on_disk) - set(pages))
    assert missing == [], f"add these pages to nav: in mkdocs.yml: {missing}"
    assert sorted(set(pages) - set(on_disk)) == [], "nav names pages that are not in docs/"
    assert len(pages) == len(set(pages)), "a page is listed twice"
    assert pages[0] == "index.md", "the site's front page comes first"


def test_the_build_is_strict_and_a_page_outside_nav_is_a_warning():
    text = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^strict: true$", text, re.M)
    assert re.search(r"^\s+omitted_files: warn\b", text, re.M)
    assert re.search(r"^\s+anchors: warn\b", text, re.M)
