"""The wire protocol, as data. Pure: no I/O, no asyncio, no zmq.

A message on the wire is a header frame, followed by body frames for the
commands that carry messages (Send, GroupSend, Return, Deliver)::

    [header]            or      [header, body, body, ...]

``header`` is one version byte (``VERSION``) followed by a msgpack array
whose first element is the command tag (a closed union of the structs
below, encoded by msgspec). ``body`` is opaque bytes: the broker never
decodes it, and forwards the very frame that arrived (one buffer shared by
every recipient of a group fan-out). The ROUTER side sees the sender's
routing id as an extra first frame. See docs/protocol.md.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Union

import msgspec

from .exceptions import BrokerError, InvalidName, ProtocolError

__all__ = [
    "MAX_BATCH",
    "MAX_NAME_LENGTH",
    "MAX_PREFIX_LENGTH",
    "PIPELINE_SLACK",
    "VERSION",
    "Command",
    "Deliver",
    "Reply",
    "check_channel_name",
    "check_group_name",
    "check_prefix",
    "decode_command",
    "decode_to_client",
    "encode",
    "in_namespace",
]

#: Version 2: receivers report what they consumed (``Consumed``), so that a
#: message delivered to a process and not yet read counts against capacity.
VERSION = 2
_VERSION_BYTE = bytes([VERSION])

#: The longest namespace prefix (see ``in_namespace``).
MAX_PREFIX_LENGTH = 63
#: Channels' own limit is ``len(name) < 100``; a name on the wire may also
#: carry a namespace prefix and its dot: ``prefix.name``.
MAX_NAME_LENGTH = 100 + MAX_PREFIX_LENGTH + 1
#: Most body frames one Send, Return or Deliver may carry.
MAX_BATCH = 1024
#: Unchecked (pipelined) sends are refused only past this multiple of capacity.
PIPELINE_SLACK = 2
#: Most credit one Subscribe may grant, and one endpoint may hold.
MAX_CREDIT = 1 << 16
#: Longest time-to-live, in seconds (a year); ttls must be finite and positive.
MAX_TTL = 366 * 86400.0


class _Msg(msgspec.Struct, array_like=True, tag_field="t"):
    pass


# --- client -> broker -------------------------------------------------------
class Hello(_Msg, tag=1):
    """First message of a connection (and of every reconnection).
    ``shared_bodies``: this client reads ``Deliver.body_of``, so the broker
    may send a body once for several of its channels (a client that does not
    say so, or says nothing, gets one body frame per message). ``host``,
    ``pid`` and ``name`` describe the client's process, for the broker's
    stats; older clients leave them out (the defaults)."""

    req: int
    client_id: str
    heartbeat: float  # seconds between the client's heartbeats
    shared_bodies: bool = False
    host: str = ""
    pid: int = 0
    name: str = ""  # the process's command line, shortened


class Send(_Msg, tag=2):
    """Queue the body frames (one or more, in order) on ``channel``.
    ``checked``: refuse at ``capacity`` (all or nothing) and always reply;
    unchecked (pipelined) sends are refused only at ``PIPELINE_SLACK`` times
    the capacity and are answered only on error."""

    req: int
    channel: str
    ttl: float
    capacity: int
    checked: bool = True


class GroupSend(_Msg, tag=3):
    """Queue the body on every member of ``group``. A member's capacity is
    that of the first ``capacities`` rule (regex, capacity) whose pattern
    matches its name (``re.match``), else ``capacity``; full members are
    skipped."""

    req: int
    group: str
    ttl: float
    capacity: int
    capacities: list[tuple[str, int]] = []
    #: The sender's namespace: rules are matched against member names
    #: without ``prefix.`` (the names its users see).
    prefix: str = ""


class GroupAdd(_Msg, tag=4):
    req: int
    group: str
    channel: str
    ttl: float


class GroupDiscard(_Msg, tag=5):
    req: int
    group: str
    channel: str


class Subscribe(_Msg, tag=6):
    """Grant ``credit`` more deliveries of ``channel`` to this client."""

    req: int
    channel: str
    credit: int


class Unsubscribe(_Msg, tag=7):
    """Withdraw all credit for ``channel``."""

    req: int
    channel: str


class Return(_Msg, tag=8):
    """Hand delivered, unread messages (body frames, oldest first) back to
    the head of ``channel``'s queue; ``ttls``: seconds each has left.
    ``epoch``: the flush epoch the client knew when it sent them (if a
    flush of the channel's namespace came later, they were flushed and are
    dropped)."""

    channel: str
    ttls: list[float]
    epoch: int = 0


class Flush(_Msg, tag=9):
    """Drop the queued messages and groups of namespace ``prefix`` (names
    ``prefix.*``); ``""``: everything."""

    req: int
    prefix: str = ""


class Heartbeat(_Msg, tag=10):
    req: int


class Stats(_Msg, tag=11):
    """The broker's counters. ``top`` 0: the flat dict of counters; ``top``
    N > 0: the detailed form, with the N deepest channels and the N clients
    holding most (at most ``server.stats.MAX_TOP``; see docs/protocol.md)."""

    req: int
    top: int = 0


class Bye(_Msg, tag=12):
    """The client is closing: drop its endpoints now."""


class Consumed(_Msg, tag=13):
    """Receives here returned ``counts[i]`` messages of ``channels[i]`` since
    the last report: they no longer count against those channels' capacity.
    A channel's counts are ignored if a flush of its namespace came after
    ``epoch`` (they are about messages that flush dropped). Never answered."""

    epoch: int
    channels: list[str]
    counts: list[int]


# --- client -> broker: task queues (kombu's AMQP model; see server/tasks.py) ---
class TaskCommand(_Msg):
    """A command on task queues; the broker answers each with a ``Reply``
    unless its text says otherwise. ``session`` is the client's channel
    number (kombu's ``channel_id``): prefetch and delivery tags are per
    session, as AMQP's are per channel."""


class Open(TaskCommand, tag=30):
    """Use task queues in virtual host ``vhost`` (names in another vhost are
    another namespace). Starts the connection's task state afresh."""

    req: int
    vhost: str = "/"


class ExchangeDeclare(TaskCommand, tag=31):
    req: int
    exchange: str
    type: str = "direct"
    passive: bool = False
    durable: bool = False
    auto_delete: bool = False


class ExchangeDelete(TaskCommand, tag=32):
    req: int
    exchange: str
    if_unused: bool = False


class QueueDeclare(TaskCommand, tag=33):
    """``value``: ``[queue, ready messages, consumers]``."""

    req: int
    queue: str
    passive: bool = False
    durable: bool = False
    exclusive: bool = False
    auto_delete: bool = False
    #: ``x-expires``, ``x-message-ttl`` (milliseconds), ``x-max-length``
    arguments: dict[str, Any] = {}


class QueueBind(TaskCommand, tag=34):
    req: int
    queue: str
    exchange: str
    routing_key: str = ""


class QueueUnbind(TaskCommand, tag=35):
    req: int
    queue: str
    exchange: str
    routing_key: str = ""


class QueuePurge(TaskCommand, tag=36):
    """``value``: how many ready messages were dropped."""

    req: int
    queue: str


class QueueDelete(TaskCommand, tag=37):
    """``value``: how many ready messages went with the queue."""

    req: int
    queue: str
    if_unused: bool = False
    if_empty: bool = False


class Publish(TaskCommand, tag=38):
    """Route the one body frame through ``exchange`` (``""``: the queue
    named ``routing_key``). ``priority`` 0-9 (9 first); ``ttl`` seconds
    (0: none). Answered when ``confirm`` (``value``: how many queues took
    it), otherwise only on error."""

    req: int
    exchange: str
    routing_key: str
    priority: int = 0
    ttl: float = 0.0
    confirm: bool = False
    #: Keep it on disk if the queue is durable and the broker has a store
    #: (AMQP's delivery mode 2); a confirm then means "on disk".
    persistent: bool = False


class Consume(TaskCommand, tag=39):
    req: int
    session: int
    queue: str
    tag: str
    no_ack: bool = False


class Cancel(TaskCommand, tag=40):
    req: int
    session: int
    tag: str


class Qos(TaskCommand, tag=41):
    """At most ``prefetch`` unacknowledged deliveries in the session (0: no
    limit). May change at any time."""

    req: int
    session: int
    prefetch: int


class Ack(TaskCommand, tag=42):
    """Never answered. ``multiple``: every tag up to the largest given (tag
    0: every unacknowledged one, as AMQP)."""

    session: int
    tags: list[int]
    multiple: bool = False


class Reject(TaskCommand, tag=43):
    """Never answered. ``requeue``: back to the head of the queue, marked
    redelivered; otherwise dropped."""

    session: int
    tags: list[int]
    requeue: bool = True
    multiple: bool = False


class Recover(TaskCommand, tag=44):
    """Every unacknowledged delivery of the session goes back."""

    req: int
    session: int


class Get(TaskCommand, tag=45):
    """``value``: ``None`` (empty), or ``[tag, redelivered]`` and the
    message as the reply's one body frame."""

    req: int
    session: int
    queue: str
    no_ack: bool = False


class CloseSession(TaskCommand, tag=46):
    """The channel closed: its consumers end, its unacknowledged messages go back."""

    req: int
    session: int


class Sync(TaskCommand, tag=47):
    """Answered once everything the broker decided before it is on disk (a
    broker with a durable store), at once otherwise: a consumer that closes
    after this knows its acks will not be undone by a crash."""

    req: int


# --- broker -> client -------------------------------------------------------
class Deliver(_Msg, tag=20):
    """Messages, oldest first; ``ttls``: seconds each has left. All belong
    to ``channel``, unless ``channels`` is given: then message *i* belongs to
    ``channels[i]`` (one message to a process for many of its channels,
    e.g. after a group_send). Message *i*'s body is body frame *i*, unless
    ``body_of`` is given: then it is frame ``body_of[i]``, and a body that
    several messages share (a group_send to several channels of one
    process) travels once. Only sent to a client whose Hello said
    ``shared_bodies``."""

    channel: str
    ttls: list[float]
    channels: list[str] = []
    body_of: list[int] = []


class Reply(_Msg, tag=21):
    """Answer to request ``req``. ``code`` 0 is success, anything else is
    the ``BrokerError`` subclass with that code, rebuilt from ``value``."""

    req: int
    code: int = 0
    detail: str = ""
    value: Any = None


class Welcome(_Msg, tag=22):
    """Sent to a peer the broker does not know (it restarted, or the peer
    skipped Hello): the client says Hello again and restores its state."""

    instance: str
    max_body: int


class Flushed(_Msg, tag=23):
    """Namespace ``prefix`` (``""``: everything) was flushed: drop its
    messages delivered here and not yet read. ``epoch`` is the broker's new
    flush epoch (see ``Consumed``)."""

    epoch: int = 0
    prefix: str = ""


class TaskDeliver(_Msg, tag=24):
    """Task messages, one body frame each: body *i* is for consumer
    ``consumers[i]`` of session ``sessions[i]``, delivery tag ``tags[i]``."""

    sessions: list[int]
    consumers: list[str]
    tags: list[int]
    redelivered: list[bool]


class Ping(_Msg, tag=25):
    """Sent to check that a connection is still there (the broker saw a
    connection close and asks the clients that hold task messages); the
    client ignores it."""


Command = Union[
    Hello,
    Send,
    GroupSend,
    GroupAdd,
    GroupDiscard,
    Subscribe,
    Unsubscribe,
    Return,
    Flush,
    Heartbeat,
    Stats,
    Bye,
    Consumed,
    Open,
    ExchangeDeclare,
    ExchangeDelete,
    QueueDeclare,
    QueueBind,
    QueueUnbind,
    QueuePurge,
    QueueDelete,
    Publish,
    Consume,
    Cancel,
    Qos,
    Ack,
    Reject,
    Recover,
    Get,
    CloseSession,
    Sync,
]
ToClient = Union[Deliver, Reply, Welcome, Flushed, TaskDeliver, Ping]

_encoder = msgspec.msgpack.Encoder()
_command_decoder = msgspec.msgpack.Decoder(Command)
_to_client_decoder = msgspec.msgpack.Decoder(ToClient)


def encode(msg: _Msg) -> bytes:
    """Encode one header (version byte + msgpack)."""
    return _VERSION_BYTE + _encoder.encode(msg)


def _decode(decoder: msgspec.msgpack.Decoder, header: Any) -> Any:
    view = memoryview(header)
    if len(view) < 2:
        raise ProtocolError("truncated header")
    if view[0] != VERSION:
        raise ProtocolError(f"unsupported protocol version {view[0]} (this side speaks {VERSION})")
    try:
        return decoder.decode(view[1:])
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise ProtocolError(f"malformed header: {exc}") from None
    except RecursionError:  # msgspec recurses into nesting, even in ignored trailing fields
        raise ProtocolError("malformed header: nested too deeply") from None
    except (UnicodeDecodeError, ValueError, OverflowError) as exc:  # e.g. invalid UTF-8 in a string
        raise ProtocolError(f"malformed header: {exc}") from None


def decode_command(header: Any) -> Command:
    """Decode a client's header; raises ``ProtocolError``."""
    return _decode(_command_decoder, header)  # type: ignore[no-any-return]


def decode_to_client(header: Any) -> Deliver | Reply | Welcome | Flushed | TaskDeliver | Ping:
    """Decode a broker's header; raises ``ProtocolError``."""
    return _decode(_to_client_decoder, header)  # type: ignore[no-any-return]


def error_reply(req: int, exc: BrokerError) -> Reply:
    return Reply(req, exc.code, str(exc), exc.fields())


# Channels' patterns, matched whole (``fullmatch``: no trailing newline slips by).
_CHANNEL_RE = re.compile(r"[a-zA-Z\d\-_.]+(\![\d\w\-_.]*)?")
_GROUP_RE = re.compile(r"[a-zA-Z\d\-_.]+")


class NameCache:
    """Names already found valid (a bounded set): checking a name costs a
    regex match, and the same names are checked on every message. Large
    enough for a process's channels (a group of 10,000 members spread over
    a few processes; 4,096 names made every receive of a 5,000-member
    process a regex match), and full, it forgets the older half rather than
    everything at once."""

    def __init__(self, size: int = 1 << 15) -> None:
        self._names: dict[str, None] = {}
        self._size = size

    def __contains__(self, name: Any) -> bool:
        return type(name) is str and name in self._names

    def add(self, name: str) -> None:
        names = self._names
        if len(names) >= self._size:
            for old in list(itertools.islice(names, max(1, self._size // 2))):
                del names[old]
        names[name] = None


_valid_channels = NameCache()


def check_channel_name(name: Any) -> str:
    """Channels' rules for a channel name; raises ``InvalidName``."""
    if name in _valid_channels:
        return name  # type: ignore[no-any-return]
    if not isinstance(name, str) or len(name) >= MAX_NAME_LENGTH or not _CHANNEL_RE.fullmatch(name):
        raise InvalidName(name, "invalid channel name")
    _valid_channels.add(name)
    return name


def check_group_name(name: Any) -> str:
    """Channels' rules for a group name; raises ``InvalidName``."""
    if not isinstance(name, str) or len(name) >= MAX_NAME_LENGTH or not _GROUP_RE.fullmatch(name):
        raise InvalidName(name, "invalid group name")
    return name


_PREFIX_RE = re.compile(r"[a-zA-Z\d\-_]*")


def check_prefix(prefix: Any) -> str:
    """A namespace prefix: ``""`` (none) or letters, digits, ``-`` and ``_``
    (no dot, so namespaces never nest), at most ``MAX_PREFIX_LENGTH``
    characters; raises ``InvalidName``."""
    if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX_LENGTH or not _PREFIX_RE.fullmatch(prefix):
        raise InvalidName(prefix, "invalid namespace prefix")
    return prefix


def in_namespace(name: str, prefix: str) -> bool:
    """True if ``name`` (a channel or group on the wire) is in namespace
    ``prefix``: named ``prefix.*``. Every name is in namespace ``""``."""
    return not prefix or (name.startswith(prefix) and name[len(prefix) : len(prefix) + 1] == ".")
