"""The deselected channels_redis tests: ``tests/peers/deselected.py`` is the
list, and the table in ``docs/channels-redis-deviations.md`` must name the
same tests."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_deselected() -> dict[tuple[str, str], str]:
    spec = importlib.util.spec_from_file_location("peers_deselected", REPO / "tests" / "peers" / "deselected.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DESELECTED


def test_docs_table_names_the_deselected_tests() -> None:
    text = (REPO / "docs" / "channels-redis-deviations.md").read_text()
    section = text.split("## channels_redis's own tests", 1)[1]
    documented = set(re.findall(r"^\| `(test_\w+\.py)::(test_\w+)` \|", section, flags=re.MULTILINE))
    assert documented == set(load_deselected())


def test_every_deselection_gives_a_kind_of_reason() -> None:
    for key, reason in load_deselected().items():
        assert reason.startswith(("internals: ", "deviation row ")), key
