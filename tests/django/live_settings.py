"""Settings for ``live_tests`` (Channels' ``ChannelsLiveServerTestCase``),
run by ``test_live_server.py`` with Django's own test runner in a
subprocess: tests/django/settings.py (the layer on ``DMB_TEST_ADDRESS``)
plus an ASGI application and a file-based sqlite database in
``DMB_TEST_DB_DIR``, since the live server test case refuses an in-memory
one."""

import os

from settings import *  # noqa: F403

_db_dir = os.environ["DMB_TEST_DB_DIR"]

ASGI_APPLICATION = "live_app.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(_db_dir, "live.sqlite3"),
        "TEST": {"NAME": os.path.join(_db_dir, "test_live.sqlite3")},
    }
}
