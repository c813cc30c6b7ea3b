"""Minimal Django settings for the Django-integration tests.

In-process tests get these through tests/django/conftest.py
(``settings.configure``) and change ``CHANNEL_LAYERS`` per test with
``override_settings``. Subprocesses use them as ``DJANGO_SETTINGS_MODULE =
"settings"`` (with tests/django on ``PYTHONPATH``) and pick the layer's
options from the environment:

- ``DMB_TEST_ADDRESS``: the broker address (``CONFIG["address"]``);
- ``DMB_TEST_PORT``: instead, the predecessor's ``ip_address``/``port`` spelling;
- ``DMB_TEST_EMBEDDED``: "1"/"0" for ``embedded``, "default" to leave it out
  (the layer's own default: embedded for a local address). Default "0";
- ``DMB_TEST_IDLE_TIMEOUT``: ``embedded_idle_timeout``;
- ``DMB_TEST_TIMEOUT``: the client's request ``timeout``.
"""

import os
from pathlib import Path

#: In-process tests (``settings.configure``) and subprocesses share it, so
#: they share the layer's default ``prefix`` (namespace.py) and meet.
BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = "django-message-broker-tests"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["*"]
DATABASES: dict = {}
INSTALLED_APPS = ["channels", "django_message_broker"]

_config: dict = {}
if os.environ.get("DMB_TEST_PORT"):
    _config["ip_address"] = "127.0.0.1"
    _config["port"] = int(os.environ["DMB_TEST_PORT"])
else:
    _config["address"] = os.environ.get("DMB_TEST_ADDRESS", "tcp://127.0.0.1:5556")
_embedded = os.environ.get("DMB_TEST_EMBEDDED", "0")
if _embedded != "default":
    _config["embedded"] = _embedded == "1"
if os.environ.get("DMB_TEST_IDLE_TIMEOUT"):
    _config["embedded_idle_timeout"] = float(os.environ["DMB_TEST_IDLE_TIMEOUT"])
if os.environ.get("DMB_TEST_TIMEOUT"):
    _config["timeout"] = float(os.environ["DMB_TEST_TIMEOUT"])

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "django_message_broker.ChannelsServerLayer",
        "CONFIG": _config,
    }
}
