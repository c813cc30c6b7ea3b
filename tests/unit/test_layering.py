"""The pure core imports no asyncio, zmq or django (STYLE: "a test can
prove the layering"). Each module is imported in a fresh interpreter with
those packages blocked by a meta-path finder that raises ImportError. The
packages' ``__init__`` modules (which re-export the clients and the shell)
are not run: the modules are loaded from their directories, so what is
tested is what each module itself imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(60)

PURE = [
    "django_message_broker.protocol",
    "django_message_broker.server.broker",
    "django_message_broker.server.outbox",
    "django_message_broker.server.groups",
    "django_message_broker.server.data_message",
    "django_message_broker.server.server_queue",
    "django_message_broker.server.stats",
]

BLOCKER = textwrap.dedent(
    """
    import importlib, importlib.util, sys, types

    BLOCKED = ("asyncio", "zmq", "django")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the pure core must not import it")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, Blocker())
    for package in ("django_message_broker", "django_message_broker.server"):
        spec = importlib.util.find_spec(package)  # finds, runs nothing
        stub = types.ModuleType(package)
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules[package] = stub
    module = importlib.import_module(sys.argv[1])
    loaded = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ok", module.__name__)
    """
)


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_without_asyncio_zmq_or_django(module):
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER, module], capture_output=True, text=True, timeout=50, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok {module}"


def test_the_blocker_blocks():
    """The check itself works: the shell does import zmq."""
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER, "django_message_broker.server.server"],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode != 0 and "is blocked" in result.stderr
