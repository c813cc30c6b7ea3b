"""``manage.py runbroker`` has the options of ``python -m django_message_broker
serve``, each with help, passes them on, and, when the embedded broker holds
its address, says so and how to stop it."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from dmb_helpers import django_env, free_port

from django_message_broker.__main__ import build_parser
from django_message_broker._runtime import files_for, read_pid_file, runtime_dir
from django_message_broker.embedded import ensure_broker, probe
from django_message_broker.management.commands import runbroker
from django_message_broker.management.commands.runbroker import Command


def option_help(parser: Any) -> dict[str, str]:
    return {
        action.option_strings[-1]
        if action.option_strings[-1].startswith("--")
        else action.option_strings[0]: action.help
        for action in parser._actions
        if action.option_strings
    }


def runbroker_parser() -> Any:
    return Command().create_parser("manage.py", "runbroker")


def serve_parser() -> Any:
    (commands,) = [a for a in build_parser()._actions if a.dest == "command"]
    return commands.choices["serve"]


def test_runbroker_has_every_option_of_serve_each_with_help():
    ours = option_help(runbroker_parser())
    serve = option_help(serve_parser())
    # --embedded is how clients start the embedded broker: not for runbroker
    missing = set(serve) - set(ours) - {"--embedded"}
    assert not missing, f"runbroker lacks {sorted(missing)}"
    # Django's own options (--settings, --verbosity, ...) come with help
    assert [name for name, text in ours.items() if not text] == []


def test_runbroker_passes_max_queue_length_and_log_level(monkeypatch):
    seen: dict[str, Any] = {}

    async def fake_serve(address: str, **options: Any) -> None:
        seen.update(options, address=address)

    monkeypatch.setattr(runbroker, "serve", fake_serve)
    package_logger = logging.getLogger("django_message_broker")
    monkeypatch.setattr(package_logger, "level", package_logger.level)  # restored afterwards
    address = f"tcp://127.0.0.1:{free_port()}"
    call_command("runbroker", "--max-queue-length", "7", "--log-level", "warning", bind=address)
    assert (seen["address"], seen["max_queue_length"]) == (address, 7)
    assert package_logger.level == logging.WARNING
    with pytest.raises(CommandError):
        call_command("runbroker", "--log-level", "chatty", bind=address)


@pytest.fixture
def own_runtime(tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    os.chmod(xdg, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    directory = runtime_dir()
    yield directory
    for name in os.listdir(directory):
        if name.endswith(".pid"):
            pid = read_pid_file(os.path.join(directory, name))
            if pid is not None:
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX pid files")
def test_runbroker_on_the_embedded_brokers_address_names_it(spawn, own_runtime):
    port = free_port()
    spawn.watch_port(port)
    address = f"tcp://127.0.0.1:{port}"
    assert ensure_broker(address, idle_timeout=60) is True
    pid = read_pid_file(files_for(address).pid)
    process = spawn.python("-m", "django", "runbroker", "--bind", address, env=django_env())
    out, _ = process.communicate(timeout=30)
    text = out.decode(errors="replace")
    assert process.returncode != 0
    assert f"cannot serve on {address}" in text
    assert f"the embedded broker (pid {pid}" in text, text
    assert f"python -m django_message_broker stop --address {address}" in text
    assert "Traceback" not in text
    assert probe(address)


def test_runbroker_passes_the_metrics_port_and_says_when_the_extra_is_missing(monkeypatch):
    seen: dict[str, Any] = {}

    async def fake_serve(address: str, **options: Any) -> None:
        seen.update(options)

    monkeypatch.setattr(runbroker, "serve", fake_serve)
    address = f"tcp://127.0.0.1:{free_port()}"
    pytest.importorskip("prometheus_client", reason="the metrics extra: pip install -e '.[metrics]'")
    call_command("runbroker", "--metrics-port", "0", bind=address)
    assert (seen["metrics_port"], seen["metrics_host"]) == (0, None)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(CommandError, match=r"needs the 'metrics' extra"):
        call_command("runbroker", "--metrics-port", "9100", bind=address)
