"""fork(): a child gets fresh client state the first time it uses the layer,
``ProcessClient`` or a raw client, and never touches the parent's sockets
or threads; the parent goes on unharmed.

Each child runs under a deadline and reports through a pipe: before the fix
a child hung for ever on its first call (it inherited a client whose I/O
thread did not exist in it), so "the child answered in time" is the test.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
import time
import uuid
from typing import Any, Callable

import pytest
from asgiref.sync import async_to_sync

from django_message_broker import SyncClient
from django_message_broker.layer import ChannelsServerLayer
from django_message_broker.worker import ProcessClient

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="fork() is POSIX only"),
    # Python 3.12+ warns that forking a threaded process may deadlock the
    # child: that is the very case these tests prove safe.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

CHILD_DEADLINE = 20.0
_fork = multiprocessing.get_context("fork")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def run_forked(target: Callable[..., Any], *args: Any) -> Any:
    """Run ``target(*args)`` in a forked child; return what it returned, or
    fail with what it raised (or with "hung" past the deadline)."""
    parent_end, child_end = _fork.Pipe(duplex=False)

    def main() -> None:
        try:
            child_end.send(("ok", target(*args)))
        except BaseException as exc:
            child_end.send(("error", f"{type(exc).__name__}: {exc}"))

    process = _fork.Process(target=main, daemon=True)
    process.start()
    try:
        if not parent_end.poll(CHILD_DEADLINE):
            pytest.fail(f"the forked child gave no answer within {CHILD_DEADLINE:g}s (hung)")
        status, value = parent_end.recv()
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join(5)
    assert status == "ok", value
    assert process.exitcode == 0
    return value


def reap(pid: int, timeout: float) -> int:
    """The exit code of a forked child, killing it if it outlives ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # already reaped
            return 0
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL
        time.sleep(0.01)


def layer_round_trip(layer: ChannelsServerLayer, channel: str, group: str) -> dict[str, Any]:
    async def talk() -> dict[str, Any]:
        mine = await layer.new_channel()
        await layer.group_add(group, mine)
        await layer.group_send(group, {"type": "from.child", "pid": os.getpid()})
        got = await asyncio.wait_for(layer.receive(mine), 5)
        await layer.send(channel, {"type": "child.done", "pid": os.getpid()})
        await layer.group_discard(group, mine)
        return got

    return async_to_sync(talk)()


def test_layer_used_before_fork_works_in_child_and_parent(broker):
    layer = ChannelsServerLayer(address=broker.address, embedded=False)
    channel, group = unique("fork-layer"), unique("fork-group")

    async def warm_up() -> None:  # the parent uses the layer: its client, I/O thread and socket exist
        await layer.send(channel, {"type": "warm"})
        assert (await asyncio.wait_for(layer.receive(channel), 5))["type"] == "warm"

    async_to_sync(warm_up)()
    parent_client = layer.client.core
    try:
        got = run_forked(layer_round_trip, layer, channel, group)
        assert got["type"] == "from.child" and got["pid"] != os.getpid()

        async def parent_goes_on() -> dict[str, Any]:
            done = await asyncio.wait_for(layer.receive(channel), 5)  # what the child sent
            await layer.send(channel, {"type": "parent.again"})
            assert (await asyncio.wait_for(layer.receive(channel), 5))["type"] == "parent.again"
            return done

        done = async_to_sync(parent_goes_on)()
        assert done == {"type": "child.done", "pid": got["pid"]}
        assert layer.client.core is parent_client, "the parent's connection must be untouched"
    finally:
        async_to_sync(layer.flush)()
        async_to_sync(layer.close)()


def process_client_in_child(client: ProcessClient, channel: str) -> str:
    client.send(channel, {"type": "child.sync"})
    mine = client.new_channel()
    client.send(mine, {"type": "to.self"})
    return str(client.receive(mine, timeout=5)["type"])


def test_process_client_used_before_fork(broker):
    client = ProcessClient(address=broker.address, embedded=False)
    channel = unique("fork-pc")
    try:
        client.send(channel, {"type": "warm"})
        assert client.receive(channel, timeout=5)["type"] == "warm"
        assert run_forked(process_client_in_child, client, channel) == "to.self"
        assert client.receive(channel, timeout=5)["type"] == "child.sync"
        client.send(channel, {"type": "parent.again"})
        assert client.receive(channel, timeout=5)["type"] == "parent.again"
    finally:
        client.close()


def send_and_exit_without_close(client: SyncClient, channel: str, count: int) -> int:
    for n in range(count):
        client.send(channel, b"%d" % n, capacity=count + 1)  # pipelined: returns before the broker has it
    return count


def test_raw_client_child_that_exits_without_close_still_sends(broker):
    """A multiprocessing child ends with os._exit() after its finalizers
    (no atexit handlers): its pipelined sends must still go out."""
    channel = unique("fork-raw")
    with SyncClient(broker.address, timeout=5) as client:
        client.send(channel, b"warm")
        assert client.receive(channel, timeout=5) == b"warm"
        assert run_forked(send_and_exit_without_close, client, channel, 500) == 500
        got = [client.receive(channel, timeout=5) for _ in range(500)]
        assert got == [b"%d" % n for n in range(500)]


def test_preload_then_fork_workers(broker):
    """The gunicorn ``--preload`` pattern: the application sends at import
    in the master, then the master forks workers that serve requests (here:
    each joins a group, receives a group_send and answers on a channel)."""
    layer = ChannelsServerLayer(address=broker.address, embedded=False)
    results = unique("preload-results")
    group = unique("preload-group")
    async_to_sync(layer.send)(unique("preload-import"), {"type": "app.imported"})  # "at import"

    def worker(index: int) -> None:
        async def serve() -> None:
            mine = await layer.new_channel()
            await layer.group_add(group, mine)
            await layer.send(results, {"type": "ready", "worker": index})
            message = await asyncio.wait_for(layer.receive(mine), 10)
            await layer.send(results, {"type": "answer", "worker": index, "text": message["text"]})

        async_to_sync(serve)()

    pids = []
    for index in range(3):
        pid = os.fork()
        if pid == 0:  # a worker: run, then leave without running the parent's cleanup
            code = 1
            try:
                worker(index)
                async_to_sync(layer.close)()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    try:

        async def master() -> list[dict[str, Any]]:
            ready = [await asyncio.wait_for(layer.receive(results), CHILD_DEADLINE) for _ in pids]
            assert sorted(m["worker"] for m in ready) == [0, 1, 2]
            await layer.group_send(group, {"type": "broadcast", "text": "hello workers"})
            return [await asyncio.wait_for(layer.receive(results), CHILD_DEADLINE) for _ in pids]

        answers = async_to_sync(master)()
        assert sorted(a["worker"] for a in answers) == [0, 1, 2]
        assert {a["text"] for a in answers} == {"hello workers"}
        assert [reap(pid, CHILD_DEADLINE) for pid in pids] == [0, 0, 0]
    finally:
        for pid in pids:
            reap(pid, 1.0)  # already reaped, unless the test failed
        async_to_sync(layer.flush)()
        async_to_sync(layer.close)()


async def test_receive_on_another_instances_process_channel_fails_fast(broker):
    owner = ChannelsServerLayer(address=broker.address, embedded=False)
    other = ChannelsServerLayer(address=broker.address, embedded=False)
    try:
        channel = await owner.new_channel()
        with pytest.raises(AssertionError):  # also our SubscriptionError
            await asyncio.wait_for(other.receive(channel), 2)
        from django_message_broker import SubscriptionError

        with pytest.raises(SubscriptionError, match="another layer instance"):
            await asyncio.wait_for(other.receive("specific.0123456789abcdef!x"), 2)
        await other.send(channel, {"type": "for.owner"})
        assert (await asyncio.wait_for(owner.receive(channel), 5))["type"] == "for.owner"
    finally:
        await owner.flush()
        await owner.close()
        await other.close()
