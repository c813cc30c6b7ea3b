"""The channels_redis tests that ``make test-peers`` does not run, by name.

Only two kinds of test belong here (issue #8):

* a test that reads Redis internals or another layer's private attributes,
  which ``ChannelsServerLayer`` does not have and should not fake;
* a test of a documented deviation: the row number is the one in
  ``docs/channels-redis-deviations.md``.

A test that fails because our layer behaves wrongly is a bug, never a reason
to list it here. ``docs/channels-redis-deviations.md`` ("channels_redis's own
tests") repeats this table.
"""

from __future__ import annotations

#: (test file, test function name) -> why it is not run. A parametrized test
#: is named once, without its parameters.
DESELECTED: dict[tuple[str, str], str] = {
    # -- tests/test_core.py --------------------------------------------------
    ("test_core.py", "test_default_group_key_format"): (
        "internals: calls RedisChannelLayer._group_key() and checks the Redis key b'asgi:group:...'"
    ),
    ("test_core.py", "test_custom_group_key_format"): (
        "internals: calls RedisChannelLayer._group_key() to check the Redis key prefix ('prefix=')"
    ),
    ("test_core.py", "test_receive_buffer_respects_capacity"): (
        "internals: fills RedisChannelLayer.receive_buffer (its per-channel BoundedQueue) directly"
    ),
    # -- tests/test_pubsub.py ------------------------------------------------
    ("test_pubsub.py", "test_receive_on_non_owned_general_channel"): (
        "deviation row 1: sends the str 'message.1' as a message; ours raises TypeError for a non-dict"
    ),
    ("test_pubsub.py", "test_loop_instance_channel_layer_reference"): (
        "internals: calls RedisPubSubChannelLayer._get_layer() (its per-event-loop RedisPubSubLoopLayer)"
    ),
    ("test_pubsub.py", "test_serialize"): (
        "internals: calls the layer's serialize() and compares the msgpack bytes of its serializer"
    ),
    ("test_pubsub.py", "test_deserialize"): (
        "internals: calls the layer's deserialize() on msgpack bytes of its serializer"
    ),
    ("test_pubsub.py", "test_multi_event_loop_garbage_collection"): (
        "internals: counts RedisPubSubChannelLayer._layers (one layer object per event loop)"
    ),
    ("test_pubsub.py", "test_auto_reconnect"): (
        "internals: closes channel_layer._shards[0]._redis (a redis-py connection) with _close_redis()"
    ),
}
