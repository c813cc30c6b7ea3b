"""The documented public API of ``django_message_broker.server.server_queue``,
exactly as /work/shared/spec/server_queue_api.txt gives it, and the package's
``__all__``."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

import django_message_broker
from django_message_broker.server import server_queue
from django_message_broker.server.server_queue import ChannelQueue, Endpoint, RoundRobinDict

EMPTY = inspect.Parameter.empty
POK = inspect.Parameter.POSITIONAL_OR_KEYWORD


def params(obj):
    return list(inspect.signature(obj).parameters.values())


# -- Endpoint -------------------------------------------------------------------
def test_endpoint_is_a_dataclass_with_the_documented_fields_in_order():
    assert dataclasses.is_dataclass(Endpoint)
    sig = params(Endpoint)
    assert [p.name for p in sig] == [
        "socket",
        "dealer",
        "subscriber_name",
        "is_process_channel",
        "time_to_live",
        "expiry",
    ]
    assert all(p.kind is POK for p in sig)


def test_endpoint_defaults():
    by_name = {p.name: p for p in params(Endpoint)}
    assert by_name["socket"].default is EMPTY  # required
    assert by_name["subscriber_name"].default == b""
    assert by_name["is_process_channel"].default is False
    assert by_name["time_to_live"].default == 86400
    assert by_name["expiry"].default is None

    fields = {f.name: f for f in dataclasses.fields(Endpoint)}
    # ``dealer: List = <factory>``: a fresh list per instance.
    assert fields["dealer"].default is dataclasses.MISSING
    assert fields["dealer"].default_factory is list
    a, b = Endpoint(object()), Endpoint(object())
    assert a.dealer == [] and b.dealer == []
    assert a.dealer is not b.dealer
    assert a.subscriber_name == b"" and a.is_process_channel is False
    assert a.time_to_live == 86400 and a.expiry is None


def test_endpoint_id_is_a_frozenset_of_routing_and_channel_name():
    sock = object()
    e = Endpoint(sock, [b"dealer-1"], b"chan")
    assert isinstance(type(e).__dict__["id"], property)
    assert isinstance(e.id, frozenset)
    assert e.id == frozenset({b"dealer-1", b"chan"})
    # Same routing and name: same id; different dealer or name: different id.
    assert Endpoint(object(), [b"dealer-1"], b"chan").id == e.id
    assert Endpoint(sock, [b"dealer-2"], b"chan").id != e.id
    assert Endpoint(sock, [b"dealer-1"], b"other").id != e.id
    # Hashable: usable as a dictionary key.
    assert {e.id: 1}[Endpoint(sock, [b"dealer-1"], b"chan").id] == 1


# -- RoundRobinDict ---------------------------------------------------------------
def test_round_robin_dict_signature_and_methods():
    sig = params(RoundRobinDict)
    assert [(p.name, p.kind) for p in sig] == [
        ("args", inspect.Parameter.VAR_POSITIONAL),
        ("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
    assert callable(RoundRobinDict.__next__)
    assert [p.name for p in params(RoundRobinDict.__next__)] == ["self"]
    assert [p.name for p in params(RoundRobinDict.first_key)] == ["self"]


def test_round_robin_dict_documented_behaviour():
    d = RoundRobinDict()
    assert next(d) is None  # empty: None, not StopIteration
    assert d.first_key() is None
    d["a"], d["b"], d["c"] = 1, 2, 3
    assert d.first_key() == "a"
    # Values (not keys), by insertion order, starting with the first, rolling over.
    assert [next(d) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    # Built like a dict.
    assert RoundRobinDict({"x": 1}, y=2).first_key() == "x"
    assert dict(RoundRobinDict({"x": 1}, y=2)) == {"x": 1, "y": 2}


# -- ChannelQueue -----------------------------------------------------------------
def test_channel_queue_constructor():
    sig = params(ChannelQueue)
    documented = [p for p in sig if p.kind is POK]
    assert [(p.name, p.default) for p in documented] == [("channel_name", b""), ("max_length", None)]
    # Extensions (``clock=``, ``meter=``) are keyword-only with defaults, so
    # every documented call still works.
    extra = sig[len(documented) :]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not EMPTY for p in extra)
    q = ChannelQueue()
    assert q.channel_name == b"" and q.max_length is None


METHODS = {
    "stop": ["self"],
    "_set_subscribers_available": ["self"],
    "_set_messages_available": ["self"],
    "is_empty": ["self"],
    "event_loop": ["self"],
    "subscribe": ["self", "endpoint"],
    "push": ["self", "message", "time_to_live"],
    "pull_and_send": ["self"],
    "discard": ["self", "endpoint"],
    "_flush_messages": ["self"],
    "_flush_subscribers": ["self"],
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_channel_queue_documented_methods(name):
    method = getattr(ChannelQueue, name)
    assert inspect.isfunction(method)
    assert [p.name for p in params(method)] == METHODS[name]
    is_coroutine = name in ("event_loop", "pull_and_send")
    assert inspect.iscoroutinefunction(method) is is_coroutine


def test_push_time_to_live_defaults_to_60():
    assert inspect.signature(ChannelQueue.push).parameters["time_to_live"].default == 60


def test_subscription_error_and_data_message_exist():
    assert issubclass(server_queue.SubscriptionError, Exception)
    assert server_queue.SubscriptionError is django_message_broker.SubscriptionError
    dm = importlib.import_module("django_message_broker.server.data_message")
    assert inspect.isclass(dm.DataMessage)
    assert server_queue.DataMessage is dm.DataMessage
    for name in ("Endpoint", "RoundRobinDict", "ChannelQueue", "SubscriptionError", "DataMessage"):
        assert name in server_queue.__all__


# -- package ----------------------------------------------------------------------
@pytest.mark.parametrize("name", django_message_broker.__all__)
def test_package_all_names_resolve(name):
    assert getattr(django_message_broker, name) is not None


def test_package_all_has_the_core_names():
    assert {
        "AsyncClient",
        "SyncClient",
        "BrokerServer",
        "BrokerError",
        "QueueFull",
        "SubscriptionError",
        "BrokerUnavailable",
    } <= set(django_message_broker.__all__)
    assert django_message_broker.__version__ == "0.3.0"
    with pytest.raises(AttributeError):
        django_message_broker.NoSuchThing  # noqa: B018
