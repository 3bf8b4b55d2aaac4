# -*- test-case-name: tests.test_tcp -*-
"""Direct TCP replication: a line protocol for each side and their factories.

The protocols are thin shells: `commands` does the wire format and the handler
(`IReplicationCommandHandler`) decides what commands mean. What lives here is
what only a byte stream needs:

- framing: one command per ``\\n``-terminated UTF-8 line, blank lines ignored,
  a bounded line length;
- direction: a server accepts only client commands and a client only server
  commands; anything else is answered with ``ERROR`` and the connection closes;
- the handshake: ``SERVER`` + ``PING`` from the server, ``NAME`` + ``PING`` +
  ``REPLICATE`` from the client;
- keepalive: a ``PING`` whenever we have sent nothing for 5 s, and a close once
  a peer that has pinged us goes 25 s without sending anything;
- backpressure: while the transport is paused, outgoing lines wait in a queue
  bounded in count and bytes; past either bound the peer is told
  ``ERROR Failed to keep up`` and dropped, so a stalled reader costs bounded
  memory and never the process.

Every protocol takes its clock, handler, names and limits explicitly, so tests
drive it with `twisted.internet.task.Clock` and a `StringTransport`.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import functools
import random
import typing
from collections import deque
from collections.abc import Callable, KeysView
from typing import Any, ClassVar, Final, Self

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import NotConnectingError
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IConsumer,
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from synapse_replication import metrics
from synapse_replication.commands import (
    VALID_CLIENT_COMMANDS,
    VALID_SERVER_COMMANDS,
    Command,
    ErrorCommand,
    NameCommand,
    PingCommand,
    RdataCommand,
    ReplicateCommand,
    ServerCommand,
    encode_command,
    parse_command_from_bytes,
)
from synapse_replication.errors import CommandEncodeError, CommandParseError, shorten
from synapse_replication.interfaces import (
    IReplicationCommandHandler,
    IReplicationConnection,
    deliver,
    dispatch_table,
)

__all__ = [
    "PING_INTERVAL_MS",
    "PING_TIMEOUT_MS",
    "Backoff",
    "BaseReplicationProtocol",
    "ClientReplicationProtocol",
    "ConnectionLimits",
    "ReplicationClientFactory",
    "ReplicationServerFactory",
    "ServerReplicationProtocol",
    "connect_replication_client",
    "listen_replication",
]

_log: Final = Logger(namespace="synapse_replication.tcp")

# Keepalive, as in DESIGN.md and as Synapse does it: each side sends something
# at least every PING_INTERVAL_MS, so a peer that has pinged us and then stays
# silent for PING_TIMEOUT_MS (five missed pings) is taken to be gone.
PING_INTERVAL_MS: Final = 5_000
PING_TIMEOUT_MS: Final = 25_000


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class ConnectionLimits:
    """How much one connection may cost us; shared by every connection a
    factory builds.

    - `max_line_length`: longest line, in bytes without the newline, that we
      accept or send (Twisted's and Synapse's default).
    - `max_pending_commands`, `max_pending_bytes`: bounds of the queue of lines
      waiting while the transport is paused (Synapse allows 10000 commands and
      no byte bound; a bound in bytes keeps 10000 rows of 16 KiB from costing
      160 MiB). Past either, the peer is dropped with ``Failed to keep up``.
    - `close_timeout`: seconds a close may wait for the peer to take our last
      bytes before the connection is aborted. A peer that stopped reading would
      otherwise hold the socket and its buffer forever.
    """

    max_line_length: int = attrs.field(default=16 * 1024, validator=_positive)
    max_pending_commands: int = attrs.field(default=10_000, validator=_positive)
    max_pending_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=_positive)
    close_timeout: float = attrs.field(default=5.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.max_pending_bytes < self.max_line_length:
            raise ValueError(
                "max_pending_bytes must hold at least one line of max_line_length"
            )


class _State(enum.Enum):
    # Built, no transport yet: sends are dropped.
    CONNECTING = enum.auto()
    # Connected: lines are read and commands sent or queued.
    OPEN = enum.auto()
    # close() was called: nothing more is read or sent; the transport is
    # draining and will be aborted after `close_timeout`.
    CLOSING = enum.auto()
    # connectionLost has run.
    CLOSED = enum.auto()


@typing.runtime_checkable
class _Abortable(typing.Protocol):
    """A transport that can drop its connection without flushing (TCP, and
    Twisted's test transports, which do not declare `ITCPTransport`)."""

    def abortConnection(self) -> None: ...


def _format_address(addr: IAddress) -> str:
    if isinstance(addr, IPv6Address):
        return f"[{addr.host}]:{addr.port}"
    if isinstance(addr, IPv4Address):
        return f"{addr.host}:{addr.port}"
    return str(addr)


@implementer(IReplicationConnection, IPushProducer)
class BaseReplicationProtocol(LineOnlyReceiver, metaclass=abc.ABCMeta):
    """What the server and the client side share: framing, direction checks,
    dispatch, keepalive and the send queue.

    Invariants: once the state leaves OPEN nothing more is read, sent or
    queued; the queue is non-empty only while paused or while being flushed,
    and any command sent meanwhile goes behind it, so lines leave in the order
    they were sent; the queue never holds more than the limits allow.
    """

    delimiter = b"\n"

    # The commands the peer may send us.
    _INBOUND: ClassVar[frozenset[str]]
    # Our side and the peer's, for logs and error messages.
    _ROLE: ClassVar[str]
    _PEER_ROLE: ClassVar[str]

    def __init__(
        self,
        *,
        clock: IReactorTime,
        handler: IReplicationCommandHandler,
        server_name: str,
        limits: ConnectionLimits = ConnectionLimits(),
        on_connection_lost: Callable[[Self], object] | None = None,
    ) -> None:
        self.MAX_LENGTH = limits.max_line_length
        self._clock = clock
        self._handler = handler
        self._server_name = server_name
        self._limits = limits
        self._on_connection_lost = on_connection_lost

        self._state = _State.CONNECTING
        self._peer_address = "(not connected)"
        self._peer_name: str | None = None
        # Whether handler.new_connection was called, so lost_connection pairs it.
        self._announced = False

        self._paused = False
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0

        self._last_sent_ms = 0
        self._last_received_ms = 0
        # The peer's timeout only applies once it has shown it sends PINGs.
        self._peer_pinged = False
        self._keepalive_call: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None

        # Every command the peer may send, mapped once to what handles it: the
        # protocol itself for handshake and keepalive, the handler for the rest.
        # A name outside `_INBOUND` has no entry and is refused.
        own = self._own_commands()
        handler_methods = dispatch_table(handler)
        self._dispatch: dict[str, Callable[[Any], None]] = {
            name: own.get(name)
            or functools.partial(deliver, handler_methods[name], self)
            for name in self._INBOUND
        }

    def _own_commands(self) -> dict[str, Callable[[Any], None]]:
        """The inbound commands this protocol handles itself, by name. The
        argument's type is the class `parse_command_from_line` gives for the
        name, hence `Any`."""
        return {PingCommand.NAME: self._on_ping, ErrorCommand.NAME: self._on_error}

    @abc.abstractmethod
    def _greeting(self, now_ms: int) -> list[Command]:
        """The commands sent, in order, as soon as the connection is made."""

    # -- IReplicationConnection

    def send_command(self, cmd: Command) -> None:
        """Write `cmd`, or queue it while the transport is paused.

        A command that cannot be encoded or is over the line limit is our bug,
        not the peer's: it is logged and dropped and the connection lives on.
        Except an RDATA over the line limit (a receipt or a typing list can be
        that big): its row must still reach the reader, so the connection is
        closed with an ERROR, and the reader reconnects and fetches the row by
        catch-up, where no line limit applies.
        """
        if self._state is not _State.OPEN:
            _log.debug(
                "{conn}: not sending {cmd}: connection is {state}",
                conn=self.describe(),
                cmd=cmd.NAME,
                state=self._state.name,
            )
            return
        line = self._encode(cmd)
        if line is None:
            return
        metrics.TCP_OUTBOUND[cmd.NAME] += 1
        self._last_sent_ms = self._now_ms()
        if self._paused or self._queue:
            self._enqueue(line)
        else:
            self._write(line)

    def close(self) -> None:
        """Stop reading and sending, let the transport flush what it holds, and
        abort it if that takes longer than `close_timeout`."""
        if self._state is not _State.OPEN:
            return
        self._state = _State.CLOSING
        self._drop_queue()
        self._cancel_keepalive()
        _log.debug("{conn}: closing", conn=self.describe())
        assert self.transport is not None
        self.transport.loseConnection()
        self._abort_call = self._clock.callLater(
            self._limits.close_timeout, self._abort
        )

    def describe(self) -> str:
        return f"tcp {self._ROLE} {self._peer_address} {self._peer_name or '(unnamed)'}"

    def peer_name(self) -> str | None:
        return self._peer_name

    @property
    def pending_commands(self) -> int:
        """Lines waiting for the transport to resume (for metrics and tests)."""
        return len(self._queue)

    @property
    def pending_bytes(self) -> int:
        """Bytes in those lines, newlines not counted."""
        return self._queued_bytes

    # -- IPushProducer: the transport tells us when its buffer is full.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        # Unpaused first, so that a transport that fills up again during the
        # flush pauses us and ends the loop; commands sent meanwhile queue
        # behind the rest (see send_command), so the order holds.
        self._paused = False
        queue = self._queue
        while queue and not self._paused and self._state is _State.OPEN:
            line = queue.popleft()
            self._queued_bytes -= len(line)
            self._write(line)

    def stopProducing(self) -> None:
        # The transport will take nothing more: it is closing or already gone
        # (TCP transports call this just before connectionLost).
        self.close()

    # -- Twisted protocol

    def connectionMade(self) -> None:
        assert self.transport is not None
        self._peer_address = _format_address(self.transport.getPeer())
        self._state = _State.OPEN
        metrics.track_connection(self, transport=metrics.TCP, side=self._ROLE, queue=self)
        IConsumer(self.transport).registerProducer(self, True)
        now = self._now_ms()
        self._last_sent_ms = self._last_received_ms = now
        _log.info("{conn}: connected", conn=self.describe())
        for cmd in self._greeting(now):
            self.send_command(cmd)
        self._schedule_keepalive(now)
        self._announced = True
        self._handler.new_connection(self)

    # `self: Self` so that `on_connection_lost` gets the subclass it was typed for.
    def connectionLost(self: Self, reason: Failure = connectionDone) -> None:
        self._state = _State.CLOSED
        metrics.untrack_connection(self, self)
        self._drop_queue()
        self._cancel_keepalive()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        _log.info(
            "{conn}: connection lost: {reason}",
            conn=self.describe(),
            reason=reason.getErrorMessage(),
        )
        if self._on_connection_lost is not None:
            self._on_connection_lost(self)
        if self._announced:
            self._announced = False
            self._handler.lost_connection(self)

    def lineReceived(self, line: bytes) -> None:
        if self._state is not _State.OPEN:
            # A close earlier in the same chunk: nothing after it counts.
            return
        self._last_received_ms = self._now_ms()
        if line[-1:] == b"\r":
            # Tolerate CRLF from hand-typed sessions; Synapse never sends it.
            line = line[:-1]
        if not line or line.isspace():
            return
        try:
            cmd = parse_command_from_bytes(line)
        except CommandParseError as e:
            bad = e.__cause__
            if isinstance(bad, UnicodeDecodeError):
                self._fail(f"Invalid UTF-8 at byte {bad.start}: {shorten(repr(line))}")
            else:
                self._fail(str(e))
            return
        metrics.TCP_INBOUND[cmd.NAME] += 1
        handle = self._dispatch.get(cmd.NAME)
        if handle is None:
            self._fail(f"{cmd.NAME} is not a command a {self._PEER_ROLE} may send")
            return
        handle(cmd)

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineOnlyReceiver keeps an over-long partial line in its buffer; drop
        # it so that a peer streaming one endless line costs nothing more.
        self._buffer = b""
        self._fail(f"Line too long: over {self.MAX_LENGTH} bytes")

    # -- commands handled here

    def _on_ping(self, cmd: PingCommand) -> None:
        self._peer_pinged = True

    def _on_error(self, cmd: ErrorCommand) -> None:
        _log.error(
            "{conn}: peer reported an error: {text}",
            conn=self.describe(),
            text=cmd.data,
        )

    # -- internals

    def _now_ms(self) -> int:
        # Rounded, not truncated: a timer due at 5000 ms must not see 4999.
        return round(self._clock.seconds() * 1000)

    def _encode(self, cmd: Command) -> bytes | None:
        try:
            line = encode_command(cmd)
        except CommandEncodeError:
            _log.failure(
                "{conn}: cannot encode {cmd}; dropped",
                conn=self.describe(),
                cmd=cmd.NAME,
            )
            return None
        if len(line) > self.MAX_LENGTH:
            if type(cmd) is RdataCommand:
                self._fail(
                    f"RDATA of {len(line)} bytes is over the {self.MAX_LENGTH} byte "
                    "line limit; fetch it by catch-up"
                )
                return None
            _log.error(
                "{conn}: {cmd} is {size} bytes, over the {limit} byte line limit; dropped",
                conn=self.describe(),
                cmd=cmd.NAME,
                size=len(line),
                limit=self.MAX_LENGTH,
            )
            return None
        return line

    def _write(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.writeSequence((line, self.delimiter))

    def _enqueue(self, line: bytes) -> None:
        limits = self._limits
        if (
            len(self._queue) >= limits.max_pending_commands
            or self._queued_bytes + len(line) > limits.max_pending_bytes
        ):
            _log.error(
                "{conn}: peer is not keeping up ({count} commands, {size} bytes queued)",
                conn=self.describe(),
                count=len(self._queue),
                size=self._queued_bytes,
            )
            self._fail("Failed to keep up")
            return
        self._queue.append(line)
        self._queued_bytes += len(line)

    def _drop_queue(self) -> None:
        self._queue.clear()
        self._queued_bytes = 0

    def _fail(self, reason: str) -> None:
        """Tell the peer what went wrong and close.

        The ERROR skips the queue: it is written even while paused, because the
        queue is about to be dropped and it is the last thing we send.
        """
        if self._state is not _State.OPEN:
            return
        _log.warn("{conn}: closing: {reason}", conn=self.describe(), reason=reason)
        line = self._encode(ErrorCommand(reason))
        if line is not None:
            metrics.TCP_OUTBOUND[ErrorCommand.NAME] += 1
            self._write(line)
        self.close()

    def _schedule_keepalive(self, now_ms: int) -> None:
        """Wake at the next moment something may be due: our next PING, or the
        peer's timeout once it pings. Sends and receives only move timestamps;
        the wake-up works out what is actually due."""
        due = self._last_sent_ms + PING_INTERVAL_MS
        if self._peer_pinged:
            due = min(due, self._last_received_ms + PING_TIMEOUT_MS)
        self._keepalive_call = self._clock.callLater(
            max(due - now_ms, 0) / 1000, self._keepalive
        )

    def _keepalive(self) -> None:
        self._keepalive_call = None
        if self._state is not _State.OPEN:
            return
        now = self._now_ms()
        if self._peer_pinged and now - self._last_received_ms >= PING_TIMEOUT_MS:
            self._fail("ping timeout")
            return
        if now - self._last_sent_ms >= PING_INTERVAL_MS:
            self.send_command(PingCommand(str(now)))
        if self._state is _State.OPEN:
            self._schedule_keepalive(now)

    def _cancel_keepalive(self) -> None:
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None

    def _abort(self) -> None:
        self._abort_call = None
        if self._state is not _State.CLOSING:
            return
        _log.warn(
            "{conn}: peer did not take our last bytes; aborting", conn=self.describe()
        )
        transport = self.transport
        if isinstance(transport, _Abortable):
            transport.abortConnection()


class ServerReplicationProtocol(BaseReplicationProtocol):
    """The accepting side: announces the server name, learns the client's."""

    _INBOUND = VALID_CLIENT_COMMANDS
    _ROLE = "server"
    _PEER_ROLE = "client"

    def _own_commands(self) -> dict[str, Callable[[Any], None]]:
        return {**super()._own_commands(), NameCommand.NAME: self._on_name}

    def _greeting(self, now_ms: int) -> list[Command]:
        return [ServerCommand(self._server_name), PingCommand(str(now_ms))]

    def _on_name(self, cmd: NameCommand) -> None:
        _log.info("{conn}: peer is named {name}", conn=self.describe(), name=cmd.data)
        self._peer_name = cmd.data


class ClientReplicationProtocol(BaseReplicationProtocol):
    """The connecting side: names itself, asks for positions, and checks that
    it reached the server it meant to."""

    _INBOUND = VALID_SERVER_COMMANDS
    _ROLE = "client"
    _PEER_ROLE = "server"

    def __init__(
        self,
        *,
        clock: IReactorTime,
        handler: IReplicationCommandHandler,
        server_name: str,
        instance_name: str,
        limits: ConnectionLimits = ConnectionLimits(),
        on_connection_lost: Callable[[Self], object] | None = None,
        on_handshake: Callable[[], object] | None = None,
    ) -> None:
        """`on_handshake` runs each time the server names itself correctly."""
        self._instance_name = instance_name
        self._on_handshake = on_handshake
        super().__init__(
            clock=clock,
            handler=handler,
            server_name=server_name,
            limits=limits,
            on_connection_lost=on_connection_lost,
        )

    def _own_commands(self) -> dict[str, Callable[[Any], None]]:
        return {**super()._own_commands(), ServerCommand.NAME: self._on_server}

    def _greeting(self, now_ms: int) -> list[Command]:
        return [
            NameCommand(self._instance_name),
            PingCommand(str(now_ms)),
            ReplicateCommand(),
        ]

    def _on_server(self, cmd: ServerCommand) -> None:
        self._peer_name = cmd.data
        if cmd.data != self._server_name:
            self._fail(
                f"Wrong remote: expected server {self._server_name!r}, "
                f"got {shorten(cmd.data, 100)!r}"
            )
            return
        if self._on_handshake is not None:
            self._on_handshake()


class ReplicationServerFactory(ServerFactory[ServerReplicationProtocol]):
    """Builds a `ServerReplicationProtocol` per accepted connection, all sharing
    one handler, clock and limits, and keeps the live ones in `connections`."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        handler: IReplicationCommandHandler,
        server_name: str,
        limits: ConnectionLimits = ConnectionLimits(),
    ) -> None:
        self._clock = clock
        self._handler = handler
        self._server_name = server_name
        self._limits = limits
        # A dict for its ordered, live keys view.
        self._connections: dict[ServerReplicationProtocol, None] = {}

    @property
    def connections(self) -> KeysView[ServerReplicationProtocol]:
        """The connections not yet lost, oldest first (a live, read-only view)."""
        return self._connections.keys()

    def buildProtocol(self, addr: IAddress | None) -> ServerReplicationProtocol:
        proto = ServerReplicationProtocol(
            clock=self._clock,
            handler=self._handler,
            server_name=self._server_name,
            limits=self._limits,
            on_connection_lost=self._forget,
        )
        proto.factory = self
        self._connections[proto] = None
        return proto

    def _forget(self, proto: ServerReplicationProtocol) -> None:
        self._connections.pop(proto, None)


@attrs.frozen(kw_only=True)
class Backoff:
    """Reconnection delays: `initial` seconds, times `factor` after each
    attempt, capped at `maximum`; each delay is then cut by a random fraction
    of up to `jitter`, so that workers dropped together do not all come back in
    the same instant. With ``factor * (1 - jitter) > 1`` the delays still grow."""

    initial: float = attrs.field(default=1.0, validator=_positive)
    factor: float = attrs.field(default=2.0, validator=attrs.validators.ge(1.0))
    maximum: float = attrs.field(default=30.0, validator=_positive)
    jitter: float = attrs.field(
        default=0.25, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)]
    )

    def __attrs_post_init__(self) -> None:
        if self.maximum < self.initial:
            raise ValueError("maximum must not be below initial")


class ReplicationClientFactory(ClientFactory[ClientReplicationProtocol]):
    """Connects a `ClientReplicationProtocol` and reconnects whenever the
    connection fails or drops, with exponential backoff and jitter, until
    `stopTrying`.

    The backoff resets when the server names itself correctly, not merely when
    TCP connects: a wrong or crashing server keeps the delays growing.

    Written instead of subclassing `ReconnectingClientFactory`, whose jitter
    compounds into the next delay, whose `resetDelay` silently undoes
    `stopTrying`, and which cannot be given a random source for tests.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        handler: IReplicationCommandHandler,
        server_name: str,
        instance_name: str,
        limits: ConnectionLimits = ConnectionLimits(),
        backoff: Backoff = Backoff(),
        rand: Callable[[], float] = random.random,
    ) -> None:
        """`rand` returns a float in [0, 1) and drives the jitter."""
        self._clock = clock
        self._handler = handler
        self._server_name = server_name
        self._instance_name = instance_name
        self._limits = limits
        self._backoff = backoff
        self._rand = rand
        self._next_delay = backoff.initial
        self._trying = True
        self._connector: IConnector | None = None
        self._retry_call: IDelayedCall | None = None

    def buildProtocol(self, addr: IAddress | None) -> ClientReplicationProtocol:
        proto = ClientReplicationProtocol(
            clock=self._clock,
            handler=self._handler,
            server_name=self._server_name,
            instance_name=self._instance_name,
            limits=self._limits,
            on_handshake=self.resetDelay,
        )
        proto.factory = self
        return proto

    def startedConnecting(self, connector: IConnector) -> None:
        self._connector = connector
        _log.info(
            "Connecting to replication server {server} at {dest}",
            server=self._server_name,
            dest=connector.getDestination(),
        )

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        _log.warn(
            "Connection to replication server {server} at {dest} failed: {reason}",
            server=self._server_name,
            dest=connector.getDestination(),
            reason=reason.getErrorMessage(),
        )
        self._retry(connector)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        # The protocol has logged the loss, naming the connection.
        _log.debug(
            "Lost connection to replication server {server} at {dest}: {reason}",
            server=self._server_name,
            dest=connector.getDestination(),
            reason=reason.getErrorMessage(),
        )
        self._retry(connector)

    def resetDelay(self) -> None:
        """Start the delays from `Backoff.initial` again."""
        self._next_delay = self._backoff.initial

    def stopTrying(self) -> None:
        """Make no more attempts: cancel a pending retry and an attempt in
        progress. A live connection is left alone; disconnect it to finish."""
        self._trying = False
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._connector is not None:
            with contextlib.suppress(NotConnectingError):
                self._connector.stopConnecting()

    def _retry(self, connector: IConnector) -> None:
        if not self._trying:
            _log.info("Not reconnecting to {server}: stopped", server=self._server_name)
            return
        backoff = self._backoff
        delay = self._next_delay * (1 - backoff.jitter * self._rand())
        self._next_delay = min(self._next_delay * backoff.factor, backoff.maximum)
        _log.info(
            "Reconnecting to {server} in {delay:.2f} s",
            server=self._server_name,
            delay=delay,
        )
        self._retry_call = self._clock.callLater(delay, self._reconnect, connector)

    def _reconnect(self, connector: IConnector) -> None:
        self._retry_call = None
        connector.connect()


def listen_replication(
    reactor: IReactorTCP,
    port: int,
    factory: ReplicationServerFactory,
    interface: str = "127.0.0.1",
) -> IListeningPort:
    """Listen for replication clients; on loopback only unless told otherwise,
    because the protocol has no authentication."""
    # listenTCP is annotated with the bare ServerFactory, whose protocol type
    # defaults to Twisted's private `_ProtoWithFactory` and is invariant, so a
    # precisely typed factory is refused; it is still a ServerFactory.
    return reactor.listenTCP(
        port, typing.cast(ServerFactory, factory), interface=interface
    )


def connect_replication_client(
    reactor: IReactorTCP,
    host: str,
    port: int,
    factory: ReplicationClientFactory,
    timeout: float = 30.0,
) -> IConnector:
    """Start connecting; `factory` keeps reconnecting from then on."""
    return reactor.connectTCP(host, port, factory, timeout=timeout)
