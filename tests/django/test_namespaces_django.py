"""The default namespace in real processes: a site's web process and worker
process, loading different settings modules (``proj.settings.dev``,
``proj.settings.worker``) of one project, meet on the broker; another site
with the same code in another directory, on the same broker, does not.
Site A defines ``BASE_DIR``; site B does not (the settings package's parent
directory is used)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from django_message_broker.namespace import prefix_for_directory

pytestmark = pytest.mark.timeout(120)

BASE = """
import os
from pathlib import Path
{base_dir}
SECRET_KEY = "namespaces"
DATABASES = {{}}
INSTALLED_APPS = ["channels", "django_message_broker"]
CHANNEL_LAYERS = {{
    "default": {{
        "BACKEND": "django_message_broker.ChannelsServerLayer",
        "CONFIG": {{"address": os.environ["DMB_NS_ADDRESS"], "embedded": False}},
    }}
}}
"""

PREFIXES = """
import json, django
django.setup()
from channels.layers import get_channel_layer
from django_message_broker import ProcessClient
with ProcessClient() as client:
    print(json.dumps([get_channel_layer().prefix, client.prefix]))
"""

SEND = """
import sys, django
django.setup()
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
layer = get_channel_layer()
async_to_sync(layer.send)("ping", {"type": "ping", "site": sys.argv[1]})
async_to_sync(layer.group_send)("room", {"type": "room", "site": sys.argv[1]})
async_to_sync(layer.close)()
"""

ADD = """
import django
django.setup()
from django_message_broker import ProcessClient
with ProcessClient() as client:
    client.group_add("room", "room-member")
"""

RECEIVE = """
import json, django
django.setup()
from django_message_broker import ProcessClient
got = []
with ProcessClient() as client:
    got.append(client.receive("ping", timeout=15)["site"])
    got.append(client.receive("room-member", timeout=15)["site"])
    for channel in ("ping", "room-member"):
        try:
            got.append(client.receive(channel, timeout=0.5)["site"])
        except TimeoutError:
            got.append(None)
print(json.dumps(got))
"""


def make_site(root: Path, with_base_dir: bool) -> Path:
    settings = root / "proj" / "settings"
    settings.mkdir(parents=True)
    (root / "proj" / "__init__.py").write_text("")
    (settings / "__init__.py").write_text("")
    base_dir = "BASE_DIR = Path(__file__).resolve().parent.parent.parent" if with_base_dir else ""
    (settings / "base.py").write_text(BASE.format(base_dir=base_dir))
    (settings / "dev.py").write_text("from .base import *  # noqa\nDEBUG = True\n")
    (settings / "worker.py").write_text("from .base import *  # noqa\nDEBUG = False\n")
    return root


def run(site: Path, module: str, script: str, address: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMB_", "DJANGO_"))}
    env.update(PYTHONPATH=str(site), DJANGO_SETTINGS_MODULE=f"proj.settings.{module}", DMB_NS_ADDRESS=address)
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, cwd=str(site), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


@pytest.fixture
def two_sites(tmp_path: Path) -> tuple[Path, Path]:
    return make_site(tmp_path / "a" / "site", True), make_site(tmp_path / "b" / "site", False)


def test_settings_modules_of_one_project_share_a_prefix(two_sites, broker):
    site_a, site_b = two_sites
    a_dev, a_worker = (json.loads(run(site_a, m, PREFIXES, broker.address)) for m in ("dev", "worker"))
    b_dev, b_worker = (json.loads(run(site_b, m, PREFIXES, broker.address)) for m in ("dev", "worker"))
    assert a_dev == a_worker == [prefix_for_directory(site_a)] * 2
    assert b_dev == b_worker == [prefix_for_directory(site_b)] * 2
    assert a_dev != b_dev


def test_web_and_worker_of_one_site_meet_and_sites_do_not(two_sites, broker):
    site_a, site_b = two_sites
    for site in (site_a, site_b):
        run(site, "worker", ADD, broker.address)  # the worker joins "room"
    run(site_b, "dev", SEND, broker.address, "B")
    run(site_a, "dev", SEND, broker.address, "A")
    assert json.loads(run(site_a, "worker", RECEIVE, broker.address)) == ["A", "A", None, None]
    assert json.loads(run(site_b, "worker", RECEIVE, broker.address)) == ["B", "B", None, None]
