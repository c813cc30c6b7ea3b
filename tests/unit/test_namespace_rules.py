"""Namespaces (``prefix``, issue #9 item 5), without sockets: the name
rules, the broker's namespaced flush and its epochs, the groups, and the
default prefix derived from a Django project's directory."""

from __future__ import annotations

import os
import sys
import types

import pytest
from test_broker import A, B, Rig

from django_message_broker import exceptions as ex
from django_message_broker import protocol as p
from django_message_broker.namespace import default_prefix, prefix_for_directory, project_directory
from django_message_broker.server.groups import Groups


# -- names ----------------------------------------------------------------------
def test_in_namespace():
    assert p.in_namespace("siteA.chat", "siteA")
    assert p.in_namespace("siteA.x!y", "siteA")
    assert not p.in_namespace("siteAB.chat", "siteA")
    assert not p.in_namespace("siteA", "siteA")
    assert not p.in_namespace("siteB.chat", "siteA")
    assert p.in_namespace("anything", "")


@pytest.mark.parametrize("prefix", ["", "a", "my-site_2", "x" * p.MAX_PREFIX_LENGTH])
def test_good_prefixes(prefix):
    assert p.check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["a.b", "a b", "x" * (p.MAX_PREFIX_LENGTH + 1), "é", None, 5])
def test_bad_prefixes(prefix):
    with pytest.raises(ex.InvalidName):
        p.check_prefix(prefix)


def test_a_longest_prefix_and_name_fit_on_the_wire():
    name = "x" * p.MAX_PREFIX_LENGTH + "." + "y" * 99  # Channels' names are < 100
    assert p.check_channel_name(name) == name and p.check_group_name(name) == name


def test_groups_clear_one_namespace():
    groups = Groups()
    groups.add("a.room", "a.x", 60, 0)
    groups.add("ab.room", "ab.x", 60, 0)
    groups.add("b.room", "b.x", 60, 0)
    groups.clear("a")
    assert groups.members("a.room", 1) == []
    assert groups.members("ab.room", 1) == ["ab.x"] and groups.members("b.room", 1) == ["b.x"]
    groups.clear()
    assert len(groups) == 0


# -- the broker -----------------------------------------------------------------
@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_flush_of_one_namespace_leaves_the_others(rig):
    rig.hello(A, B)
    rig.send(A, "a.ch", b"a1")
    rig.send(A, "b.ch", b"b1")
    rig.send(A, "other", b"o1")
    rig.handle(A, p.GroupAdd(2, "a.room", "a.ch", 60))
    rig.handle(A, p.GroupAdd(3, "b.room", "b.ch", 60))
    rig.sock.take(A)
    rig.sock.take(B)
    rig.handle(A, p.Flush(4, "a"))
    assert rig.sock.replies(A) == [p.Reply(4, 0, "", None)]
    # Every client hears which namespace was flushed.
    assert [m for m, _ in rig.sock.take(B)] == [p.Flushed(rig.broker.epoch, "a")]
    assert "a.ch" not in rig.broker.queues
    assert [m.body for m in rig.broker.queues["b.ch"].queue] == [b"b1"]
    assert [m.body for m in rig.broker.queues["other"].queue] == [b"o1"]
    assert rig.broker.groups.members("a.room", rig.now) == []
    assert rig.broker.groups.members("b.room", rig.now) == ["b.ch"]


def test_flush_without_prefix_drops_everything(rig):
    rig.hello(A)
    rig.send(A, "a.ch", b"a1")
    rig.send(A, "other", b"o1")
    rig.handle(A, p.Flush(4))
    assert rig.broker.queued() == 0


def test_a_bad_flush_prefix_is_refused(rig):
    rig.hello(A)
    rig.send(A, "a.ch", b"a1")
    rig.sock.take(A)
    rig.handle(A, p.Flush(5, "a.b"))
    assert type(rig.error(A)) is ex.InvalidName
    assert rig.broker.queued() == 1 and rig.broker.epoch == 0


def _held(rig: Rig, ident: bytes, channel: str) -> int:
    return rig.broker.clients[ident].endpoints[channel].held


def test_another_namespaces_late_return_is_kept(rig):
    """B holds a message; A's namespace is flushed; B's Return, made before B
    heard of that flush (the old epoch), is about a message the flush did
    not touch: it goes back to the queue."""
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "b.ch", 1))
    rig.send(A, "b.ch", b"kept")
    assert rig.sock.delivered(B) == [b"kept"]
    old = rig.broker.epoch
    rig.handle(A, p.Flush(6, "a"))
    assert rig.broker.queues["b.ch"].held == 1  # not zeroed: not A's
    rig.handle(B, p.Unsubscribe(7, "b.ch"))
    rig.handle(B, p.Return("b.ch", [30.0], old), b"kept")
    assert [m.body for m in rig.broker.queues["b.ch"].queue] == [b"kept"]
    assert rig.broker.queues["b.ch"].held == 0


def test_a_late_return_into_a_flushed_namespace_is_dropped(rig):
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "a.ch", 1))
    rig.send(A, "a.ch", b"gone")
    assert rig.sock.delivered(B) == [b"gone"]
    old = rig.broker.epoch
    rig.handle(A, p.Flush(6, "a"))
    rig.handle(B, p.Unsubscribe(7, "a.ch"))
    rig.handle(B, p.Return("a.ch", [30.0], old), b"gone")
    assert "a.ch" not in rig.broker.queues or not rig.broker.queues["a.ch"].queue


def test_late_consumed_reports_count_outside_the_flushed_namespace(rig):
    rig.hello(A, B)
    for channel in ("a.ch", "b.ch"):
        rig.handle(B, p.Subscribe(0, channel, 1))
        rig.send(A, channel, b"m")
    assert _held(rig, B, "b.ch") == 1 and _held(rig, B, "a.ch") == 1
    old = rig.broker.epoch
    rig.handle(A, p.Flush(6, "a"))
    assert _held(rig, B, "a.ch") == 0 and _held(rig, B, "b.ch") == 1
    rig.handle(B, p.Consumed(old, ["a.ch", "b.ch"], [1, 1]))
    assert rig.broker.queues["b.ch"].held == 0
    assert rig.broker.queues.get("a.ch") is None or rig.broker.queues["a.ch"].held == 0


def test_reports_older_than_the_remembered_flushes_are_dropped(rig):
    """Past the flush history the broker cannot tell: it drops (as before)."""
    rig.hello(A, B)
    rig.handle(B, p.Subscribe(0, "b.ch", 1))
    rig.send(A, "b.ch", b"m")
    rig.sock.take(B)
    old = rig.broker.epoch
    for req in range(300):
        rig.handle(A, p.Flush(req, "a"))
    rig.handle(B, p.Unsubscribe(7, "b.ch"))
    rig.handle(B, p.Return("b.ch", [30.0], old), b"m")
    assert not rig.broker.queues.get("b.ch") or not rig.broker.queues["b.ch"].queue


def test_group_send_rules_see_names_without_the_prefix(rig):
    rig.hello(A)
    rig.handle(A, p.GroupAdd(1, "s.room", "s.limited", 60))
    rig.handle(A, p.GroupAdd(2, "s.room", "s.open", 60))
    rig.sock.take(A)
    rules = [("^limited", 1)]  # an anchored regex, as a user may write
    for req in (3, 4):
        rig.handle(A, p.GroupSend(req, "s.room", 60, 10, rules, "s"), b"hi")
    assert rig.sock.replies(A) == [p.Reply(3, 0, "", [2, 0]), p.Reply(4, 0, "", [1, 1])]
    assert len(rig.broker.queues["s.limited"].queue) == 1
    assert len(rig.broker.queues["s.open"].queue) == 2


# -- the default prefix ------------------------------------------------------------
def test_prefix_for_directory_is_stable_valid_and_distinct(tmp_path):
    one, two = tmp_path / "one" / "mysite", tmp_path / "two" / "mysite"
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(one)
    prefix = prefix_for_directory(one)
    assert prefix.startswith("mysite-") and p.check_prefix(prefix) == prefix
    assert prefix_for_directory(str(one)) == prefix
    assert prefix_for_directory(link) == prefix
    assert prefix_for_directory(one / ".." / "mysite") == prefix
    assert prefix_for_directory(two) != prefix  # same name, another checkout


def test_prefix_for_an_odd_directory_name_is_valid(tmp_path):
    odd = tmp_path / "my site.é.v2"
    odd.mkdir()
    prefix = prefix_for_directory(odd)
    assert p.check_prefix(prefix) == prefix and len(prefix) <= p.MAX_PREFIX_LENGTH
    assert p.check_prefix(prefix_for_directory("/")) == prefix_for_directory("/")


def test_project_directory_prefers_base_dir(tmp_path):
    settings = types.SimpleNamespace(BASE_DIR=tmp_path, SETTINGS_MODULE="whatever.settings")
    assert project_directory(settings) == os.fspath(tmp_path)


def test_project_directory_from_the_settings_package(tmp_path, monkeypatch):
    """No BASE_DIR: the directory that holds the settings' top-level package,
    the same for settings.dev and settings.worker."""
    package = tmp_path / "nsproj_pkg" / "settings"
    package.mkdir(parents=True)
    for init in (package.parent / "__init__.py", package / "__init__.py", package / "dev.py", package / "worker.py"):
        init.write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    dev = types.SimpleNamespace(SETTINGS_MODULE="nsproj_pkg.settings.dev")
    worker = types.SimpleNamespace(SETTINGS_MODULE="nsproj_pkg.settings.worker")
    assert project_directory(dev) == project_directory(worker) == os.path.realpath(tmp_path)
    monkeypatch.delitem(sys.modules, "nsproj_pkg", raising=False)


def test_project_directory_from_a_top_level_settings_module(tmp_path, monkeypatch):
    (tmp_path / "nsproj_settings.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = types.SimpleNamespace(SETTINGS_MODULE="nsproj_settings")
    assert project_directory(settings) == os.path.realpath(tmp_path)


def test_project_directory_unknown():
    assert project_directory(types.SimpleNamespace()) is None
    assert project_directory(types.SimpleNamespace(SETTINGS_MODULE="no_such_module_anywhere.settings")) is None


def test_no_django_settings_no_prefix():
    from django.conf import settings

    if settings.configured:
        pytest.skip("Django is configured in this process")
    assert default_prefix() == ""
