"""What the package page shows: the README (its long description) links
only to absolute URLs, and the classifiers name exactly the Python and
Django versions that noxfile.py tests. (The built wheel itself is tried by
.ci/smoke_wheel.sh: ``make smoke``.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPO = "https://github.com/django-message-broker/django-message-broker"


def pyproject_text() -> str:
    return (ROOT / "pyproject.toml").read_text()


def classifiers() -> list[str]:
    block = re.search(r"^classifiers = \[(.*?)^\]", pyproject_text(), re.S | re.M)
    assert block is not None
    return re.findall(r'"([^"]+)"', block.group(1))


def nox_matrix() -> dict[str, tuple[list[str], str]]:
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "DJANGO" for t in targets):
                assert node.value is not None
                return ast.literal_eval(node.value)
    raise AssertionError("noxfile.py has no DJANGO matrix")


def test_readme_links_are_absolute():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    assert targets, "no links found: has the pattern broken?"
    relative = [t for t in targets if not t.startswith(("https://", "#", "mailto:"))]
    assert relative == [], "relative links break on a package page: use " + REPO + "/blob/main/..."
    assert f'Source = "{REPO}"' in pyproject_text()


def test_classifiers_list_exactly_the_tested_versions():
    matrix = nox_matrix()
    pythons = {python for pythons, _ in matrix.values() for python in pythons}
    found = classifiers()
    assert {c.rsplit(" :: ", 1)[1] for c in found if c.startswith("Programming Language :: Python :: 3.")} == pythons
    assert {c.rsplit(" :: ", 1)[1] for c in found if c.startswith("Framework :: Django :: ")} == set(matrix)
    assert any(c.startswith("Development Status :: ") for c in found)
    low = min(pythons, key=lambda v: tuple(map(int, v.split("."))))
    assert f'requires-python = ">={low}"' in pyproject_text()
