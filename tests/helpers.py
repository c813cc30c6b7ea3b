"""Helpers shared by the test tiers (``tests/`` is on ``sys.path``:
``from helpers import ...``).

- ``free_port``, ``wait_for``: for tests with real sockets and processes.
- ``BrokerThread``: a real ``BrokerServer`` on its own loop in a thread
  (the ``broker`` fixtures, and the channels_redis peer suite's plugin).
- ``FakeClock``: time as a number a test moves.
- ``Keys``, ``make_keys``: CURVE certificates for a broker and its clients.
- ``Wire``: the shell's side of the broker core: drains what it decided to
  send (``Broker.data_to_send``) and reports failed sends for busy or gone
  peers.
- ``BrokerPair``: h11's ``ConnectionPair`` for this project: the pure client
  state (``client._state.ClientState``) and the broker core
  (``server.broker.Broker``) wired together in memory. No sockets, no
  threads, no sleeping: a whole conversation runs in microseconds.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import msgspec

from django_message_broker import exceptions as ex
from django_message_broker import protocol as p
from django_message_broker.client._state import ChannelState, ClientState, Item, share_bodies
from django_message_broker.keys import create_keypair
from django_message_broker.server.broker import BUSY, GONE, Broker
from django_message_broker.server.server import BrokerServer


class BrokerThread:
    """A ``BrokerServer`` running on its own loop in a daemon thread."""

    def __init__(self, address: str = "tcp://127.0.0.1:0", **options: Any) -> None:
        self.requested = address
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.server: BrokerServer | None = None
        self.address = ""
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-broker", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            try:
                self.server = BrokerServer(self.requested, **self.options)
                await self.server.start()
                self.address = self.server.address
            except BaseException as exc:  # reported to start()
                self._error = exc
                return
            finally:
                self._started.set()
            await self.server.wait_closed()

        self.loop.run_until_complete(main())

    def start(self) -> BrokerThread:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("broker did not start")
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the broker's loop and return its result."""

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        if self.server is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self._thread.join(10)
        if not self.loop.is_closed() and not self._thread.is_alive():
            self.loop.close()


class Keys(NamedTuple):
    """CURVE certificate files: the broker's pair, an authorized client's
    pair, an unauthorized client's secret, and the broker's allow-list
    directory (holding the good client's public certificate)."""

    broker_public: Path
    broker_secret: Path
    good_public: Path
    good_secret: Path
    bad_secret: Path
    authorized: Path


def make_keys(directory: Path) -> Keys:
    broker_public, broker_secret = create_keypair("broker", directory)
    good_public, good_secret = create_keypair("good", directory)
    _, bad_secret = create_keypair("bad", directory)
    authorized = directory / "authorized"
    authorized.mkdir()
    shutil.copy(good_public, authorized)
    return Keys(broker_public, broker_secret, good_public, good_secret, bad_secret, authorized)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: Optional[str] = None, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something true, or ``timeout``
    passes. Returns the last value; with ``what``, fails instead of
    returning a false one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            if what is not None:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            return value
        time.sleep(interval)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Wire:
    """The shell's side of the sans-IO broker: takes what it decided to send
    (``data_to_send``) and decodes it into ``out``. ``busy``/``gone``: peers
    whose messages fail (reported back with ``send_failed``, as the shell
    does). ``broker`` may be replaced (a restarted broker)."""

    def __init__(self, broker: Optional[Broker] = None) -> None:
        self.broker = broker
        self.busy: set[bytes] = set()
        self.gone: set[bytes] = set()
        self.out: list[tuple[bytes, Any, list[bytes]]] = []  # (ident, decoded header, bodies)

    def pump(self) -> None:
        assert self.broker is not None
        for messages in self.broker.data_to_send():
            ident = messages[0].ident
            if ident in self.busy or ident in self.gone:
                self.broker.send_failed(messages, BUSY if ident in self.busy else GONE)
                continue
            for out in messages:
                header, *bodies = out.frames
                self.out.append((ident, p.decode_to_client(header), [bytes(b) for b in bodies]))

    def take(self, ident: bytes) -> list[tuple[Any, list[bytes]]]:
        """Messages sent to ``ident`` since the last take."""
        self.pump()
        mine = [(msg, bodies) for who, msg, bodies in self.out if who == ident]
        self.out = [m for m in self.out if m[0] != ident]
        return mine

    def replies(self, ident: bytes) -> list[p.Reply]:
        return [m for m, _ in self.take(ident) if isinstance(m, p.Reply)]

    def delivered(self, ident: bytes) -> list[bytes]:
        return [b for m, bodies in self.take(ident) if isinstance(m, p.Deliver) for b in bodies]


# -- BrokerPair -------------------------------------------------------------------
class Receive:
    """A waiting receive (meets ``client._state.Waiter``). ``settles_later``:
    an event-loop receive, whose hand-off the test settles with
    ``PureClient.settle``; else a blocked thread's, done once resolved."""

    def __init__(self, channel: ChannelState, settles_later: bool = False) -> None:
        self.channel = channel
        self.settles_later = settles_later
        self.value: Optional[Item] = None
        self.error: Optional[BaseException] = None
        self.done = False
        self.cancelled = False

    def alive(self) -> bool:
        return not self.done and not self.cancelled

    def resolve(self, value: Any = None, error: Optional[BaseException] = None) -> None:
        self.value, self.error, self.done = value, error, True

    @property
    def body(self) -> Optional[bytes]:
        return None if self.value is None else self.value[0]


class PureClient:
    """One client process: a ``ClientState`` and the little a driver adds
    (request numbers, answers, a ``connected`` flag), talking to the pair's
    broker instead of a socket."""

    def __init__(self, pair: BrokerPair, ident: bytes, *, shared_bodies: bool = True, **options: Any) -> None:
        self.pair = pair
        self.ident = ident
        #: Says so in its Hello, as the real client does: a body for several
        #: of its channels may come once (``Deliver.body_of``).
        self.shared_bodies = shared_bodies
        #: Every Deliver received: (header, number of body frames).
        self.delivers: list[tuple[p.Deliver, int]] = []
        self.state = ClientState(**{"prefetch": 4, "process_prefetch": 8, "idle_return": 1.0, **options})
        self.connected = False
        self.instance: Optional[str] = None
        self.replies: dict[int, p.Reply] = {}
        self._on_reply: dict[int, Callable[[Any], None]] = {}
        self._reqs = 0
        self.sent: list[Any] = []  # every message this client sent, for assertions

    # -- to the broker --
    def request(self, msg: Any, *bodies: bytes, on_reply: Optional[Callable[[Any], None]] = None) -> int:
        self._reqs += 1
        if on_reply is not None:
            self._on_reply[self._reqs] = on_reply
        self.post(msgspec.structs.replace(msg, req=self._reqs), *bodies)
        return self._reqs

    def post(self, msg: Any, *bodies: bytes) -> None:
        self.sent.append(msg)
        self.pair.broker.handle([self.ident, p.encode(msg), *bodies], self.pair.now)
        self.pair.pump()

    def send_out(self, out: list[Any]) -> None:
        """Send what the state returned: requests (``GroupAdd``,
        ``Unsubscribe``) numbered, the rest as they are."""
        for item in out:
            msg, bodies = item if isinstance(item, tuple) else (item, None)
            if isinstance(msg, p.GroupAdd):
                self.request(msg)
            else:
                self.post(msg, *(bodies or []))

    # -- what a driver does --
    def hello(self) -> None:
        def welcomed(value: Any) -> None:
            instance, _max_body, epoch = value
            restarted = self.instance is not None and instance != self.instance
            self.instance, self.state.epoch, self.connected = instance, epoch, True
            self.send_out(self.state.connected(self.pair.now, restarted))

        self.request(p.Hello(0, self.ident.decode(), 1.0, self.shared_bodies), on_reply=welcomed)

    def receive(self, channel: str, settles_later: bool = False) -> Receive | bytes:
        """A receive: the body if one is here, else the waiting ``Receive``."""
        item, waiter, grant = self.state.take(
            channel, self.pair.now, lambda state: Receive(state, settles_later), self.connected
        )
        if grant is not None:
            self.post(grant)
        if item is not None:
            return item[0]
        assert waiter is not None
        return waiter

    def settle(self, receive: Receive, accepted: bool = True) -> None:
        """The receive's event loop decides: take the message, or not."""
        assert receive.value is not None
        grant = self.state.settle(receive.channel, receive.value, accepted, self.pair.now, self.connected)
        if grant is not None:
            self.post(grant)

    def send(self, channel: str, body: bytes, capacity: int = 100, ttl: float = 60.0) -> Optional[ex.BrokerError]:
        """A face's send: pipelined if the window allows, else checked.
        Returns the broker's refusal, if any."""
        window = self.state.window
        if window.may_pipeline(channel, capacity, self.connected):
            self.post(p.Send(0, channel, ttl, capacity, False), body)
            return None
        req = self.request(p.Send(0, channel, ttl, capacity, True), body)
        reply = self.replies.pop(req)
        if reply.code:
            error = ex.from_wire(reply.code, reply.detail, reply.value)
            window.refused(channel, capacity, isinstance(error, ex.QueueFull))
            return error
        window.acked(channel, int(reply.value))
        return None

    def tick(self) -> None:
        """The I/O thread's turn: report consumption, withdraw idle credit."""
        report = self.state.report(self.connected)
        if report is not None:
            self.post(report)
        for unsubscribe in self.state.idle(self.pair.now):

            def withdrawn(_left: Any, name: str = unsubscribe.channel) -> None:
                self.send_out(self.state.withdrawn(name, self.pair.now, self.connected))

            self.request(unsubscribe, on_reply=withdrawn)

    # -- from the broker --
    def receive_from_broker(self, msg: Any, bodies: list[bytes]) -> None:
        match msg:
            case p.Deliver(channel, ttls, channels, body_of):
                self.delivers.append((msg, len(bodies)))
                shared = None
                if body_of:
                    bodies, shared = share_bodies(bodies, body_of)
                grants = self.state.deliver(
                    channels or [channel] * len(ttls), bodies, list(ttls), self.pair.now, shared, self.connected
                )
                for grant in grants:
                    self.post(grant)
            case p.Reply(req, code, _detail, value):
                callback = self._on_reply.pop(req, None)
                if callback is not None and not code:
                    callback(value)
                else:
                    self.replies[req] = msg
            case p.Flushed(epoch, prefix):
                self.state.flushed(epoch, prefix)
            case p.Welcome():
                pass


class BrokerPair:
    """Pure client states and the broker core, in memory. ``now`` is the
    one clock; every message is handled at once, in order."""

    def __init__(self, *idents: bytes, client_options: Optional[dict[str, Any]] = None, **broker_options: Any) -> None:
        self.now = 100.0
        self.broker = Broker(clock=lambda: self.now, **broker_options)
        self.router = Wire(self.broker)
        self.clients = {ident: PureClient(self, ident, **(client_options or {})) for ident in idents}
        for client in self.clients.values():
            client.hello()

    def __getitem__(self, ident: bytes) -> PureClient:
        return self.clients[ident]

    def pump(self) -> None:
        """Hand what the broker sent to its clients (and what they answer, in
        turn), until nothing is left."""
        self.router.pump()
        while self.router.out:
            ident, msg, bodies = self.router.out.pop(0)
            client = self.clients.get(ident)
            if client is not None:
                client.receive_from_broker(msg, bodies)
            self.router.pump()

    def restart_broker(self, **broker_options: Any) -> None:
        """A new broker instance: empty, as after a crash. Each client hears
        of it (as a driver would, from the instance id) and says Hello."""
        self.broker = self.router.broker = Broker(clock=lambda: self.now, **broker_options)
        for client in self.clients.values():
            client.hello()

    def tick(self, seconds: float = 0.0) -> None:
        self.now += seconds
        for client in self.clients.values():
            client.tick()
