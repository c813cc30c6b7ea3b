"""``manage.py brokerstats`` (issue #13 item 2): the options of ``python -m
django_message_broker stats``, the layer's address by default, JSON for
scripts, and a clear ``CommandError`` when no broker answers."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test.utils import override_settings
from dmb_helpers import free_port

from django_message_broker import SyncClient
from django_message_broker.__main__ import build_parser
from django_message_broker.management.commands.brokerstats import Command

pytestmark = pytest.mark.timeout(30)


def options_of(parser: Any) -> dict[str, str]:
    return {a.option_strings[-1] if a.option_strings[-1].startswith("--") else a.option_strings[0]: a.help
            for a in parser._actions if a.option_strings}  # fmt: skip


def layers(address: str) -> dict[str, Any]:
    return {"default": {"BACKEND": "django_message_broker.ChannelsServerLayer", "CONFIG": {"address": address}}}


def test_brokerstats_has_every_option_of_stats_each_with_help():
    (commands,) = [a for a in build_parser()._actions if a.dest == "command"]
    ours = options_of(Command().create_parser("manage.py", "brokerstats"))
    missing = set(options_of(commands.choices["stats"])) - set(ours)
    assert not missing, f"brokerstats lacks {sorted(missing)}"
    assert [name for name, text in ours.items() if not text] == []


def test_brokerstats_reads_the_layers_address(broker):
    with SyncClient(broker.address) as client:
        client.send("django.stats", b"x")
        out = io.StringIO()
        with override_settings(CHANNEL_LAYERS=layers(broker.address)):
            call_command("brokerstats", "--json", "--top", "2", stdout=out)
    detail = json.loads(out.getvalue())
    assert [row["name"] for row in detail["channels"]] == ["django.stats"]
    text = io.StringIO()
    with override_settings(CHANNEL_LAYERS=layers("tcp://127.0.0.1:1")):  # --address wins
        call_command("brokerstats", "--address", broker.address, stdout=text)
    assert "django.stats" in text.getvalue()


def test_brokerstats_without_a_broker_is_a_command_error():
    address = f"tcp://127.0.0.1:{free_port()}"
    err = io.StringIO()
    with override_settings(CHANNEL_LAYERS=layers(address)):
        with pytest.raises(CommandError, match="no stats from the broker"):
            call_command("brokerstats", "--timeout", "0.5", stderr=err)
    assert f"no broker answered at {address} within 0.5s" in err.getvalue()
