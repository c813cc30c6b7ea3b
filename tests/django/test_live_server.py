"""Channels' ``ChannelsLiveServerTestCase`` works after the layer was used in
the test process (issue #8: the forked Daphne server hung on its first layer
call and reset every websocket handshake).

``live_tests`` runs with Django's own test runner in a subprocess, against
the ``broker`` fixture (``live_settings``: this directory's settings with an
ASGI application and a file-based sqlite database). The subprocess gets its
own session, so a hung run is killed with the Daphne server it forked.
"""

from __future__ import annotations

import re
import sys

import pytest
from dmb_helpers import django_env, run_manage_test

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the live server test case forks")

RUN_TIMEOUT = 120.0
TESTS = (
    "test_websocket_receives_a_group_send_from_the_test_process",
    "test_the_same_server_serves_a_second_websocket",
)


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_channels_live_server_test_case_after_the_layer_was_used(spawn, broker, tmp_path):
    pytest.importorskip("daphne")
    pytest.importorskip("websockets")
    env = django_env(DMB_TEST_ADDRESS=broker.address, DMB_TEST_DB_DIR=tmp_path, DJANGO_SETTINGS_MODULE="live_settings")
    text = run_manage_test(spawn, "live_tests", "live_settings", env, RUN_TIMEOUT)
    for name in TESTS:
        # unittest names a test "name (module.Class.name)" since Python 3.11, "name (module.Class)" before
        pattern = rf"^{name} \(live_tests\.LiveServerAfterTheLayerWasUsed(\.{name})?\) \.\.\. ok$"
        assert re.search(pattern, text, re.M), text
    assert f"Ran {len(TESTS)} tests" in text, text
