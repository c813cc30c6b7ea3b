"""The admin stats page (issue #13 item 2). ``admin_stats_tests`` runs with
Django's own test runner in a subprocess (``admin_settings``: the admin, a
file-based sqlite database, the layer on the ``broker`` fixture), as
``test_live_server.py`` does; its own session, so a hung run is killed with
the browser it started.

The views' tests always run. The browser test needs Debian's ``chromium``
and ``chromium-driver`` (``.ci/run`` installs them) and skips, saying so,
only when they are absent; it saves a screenshot of the page."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from dmb_helpers import django_env, run_manage_test

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
RUN_TIMEOUT = 150.0


def run_django_tests(spawn, broker, tmp_path, label: str, **env: str) -> str:
    environment = django_env(
        DMB_TEST_ADDRESS=broker.address, DMB_TEST_DB_DIR=tmp_path, DJANGO_SETTINGS_MODULE="admin_settings", **env
    )
    text = run_manage_test(spawn, label, "admin_settings", environment, RUN_TIMEOUT)
    assert re.search(r"^OK$", text, re.M), text
    return text


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_admin_stats_views(spawn, broker, tmp_path):
    text = run_django_tests(spawn, broker, tmp_path, "admin_stats_tests.AdminStatsViews")
    assert "Ran 3 tests" in text, text


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_admin_stats_page_in_a_real_browser(spawn, broker, tmp_path):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"no {' or '.join(missing)}: apt-get install chromium chromium-driver (as .ci/run does)")
    pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e '.[test]'")
    screenshot = tmp_path / "admin-stats.png"
    text = run_django_tests(
        spawn, broker, tmp_path, "admin_stats_tests.AdminStatsPage",
        DMB_SCREENSHOT=str(screenshot), DMB_CHROMIUM=CHROMIUM, DMB_CHROMEDRIVER=CHROMEDRIVER,
    )  # fmt: skip
    assert "test_staff_watch_a_message_arrive" in text and "Ran 1 test" in text, text
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
