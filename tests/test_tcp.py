# -*- test-case-name: tests.test_tcp -*-
# mypy: allow-untyped-calls
# (Twisted's StringTransport, LineOnlyReceiver and iosim have no annotations;
# every call into them would otherwise need its own ignore.)
"""Tests for synapse_replication.tcp: framing, handshake, keepalive,
backpressure, in-memory conversations, real TCP and reconnection."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

from twisted.internet import reactor as _global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from synapse_replication.commands import (
    ClearUserSyncCommand,
    Command,
    FederationAckCommand,
    PositionCommand,
    RdataCommand,
    RemoteServerUpCommand,
    UserSyncCommand,
)
from synapse_replication.errors import CommandEncodeError
from synapse_replication.interfaces import (
    HandlerResult,
    IReplicationCommandHandler,
    IReplicationConnection,
)
from synapse_replication.tcp import (
    PING_INTERVAL_MS,
    PING_TIMEOUT_MS,
    Backoff,
    BaseReplicationProtocol,
    ClientReplicationProtocol,
    ConnectionLimits,
    ReplicationClientFactory,
    ReplicationServerFactory,
    ServerReplicationProtocol,
    connect_replication_client,
    listen_replication,
)

_SERVER: Final = "test.local"
_WORKER: Final = "worker1"
_DEFAULT_LIMITS: Final = ConnectionLimits()
_DEFAULT_BACKOFF: Final = Backoff()
_tcp_reactor = cast(IReactorTCP, _global_reactor)
_time_reactor = cast(IReactorTime, _global_reactor)


# -- a handler that records what it is given


@implementer(IReplicationCommandHandler)
class _RecordingHandler:
    """Records (method, connection, command) for every call; `results` makes a
    method return something (a failing coroutine, a Deferred, ...)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, IReplicationConnection, Command | None]] = []
        self.results: dict[str, Callable[[], HandlerResult]] = {}
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def methods(self) -> list[str]:
        return [method for method, _, _ in self.calls]

    def commands(self, method: str) -> list[Command]:
        return [cmd for m, _, cmd in self.calls if m == method and cmd is not None]

    def connections(self, method: str) -> list[IReplicationConnection]:
        return [conn for m, conn, _ in self.calls if m == method]

    def count(self, method: str) -> int:
        return sum(1 for m, _, _ in self.calls if m == method)

    def all_lost(self) -> bool:
        return self.count("new_connection") == self.count("lost_connection")

    def wait_for(self, predicate: Callable[[], bool]) -> Deferred[None]:
        """Fires once `predicate` holds, checked now and after every call."""
        d: Deferred[None] = Deferred()
        if predicate():
            d.callback(None)
        else:
            self._waiters.append((predicate, d))
        return d

    def _record(
        self, method: str, conn: IReplicationConnection, cmd: Command | None
    ) -> HandlerResult:
        self.calls.append((method, conn, cmd))
        for waiter in list(self._waiters):
            if waiter[0]():
                self._waiters.remove(waiter)
                waiter[1].callback(None)
        make = self.results.get(method)
        return None if make is None else make()

    def new_connection(self, connection: IReplicationConnection) -> None:
        self._record("new_connection", connection, None)

    def lost_connection(self, connection: IReplicationConnection) -> None:
        self._record("lost_connection", connection, None)

    def on_replicate(
        self, connection: IReplicationConnection, cmd: Any
    ) -> HandlerResult:
        return self._record("on_replicate", connection, cmd)

    def on_rdata(self, connection: IReplicationConnection, cmd: Any) -> HandlerResult:
        return self._record("on_rdata", connection, cmd)

    def on_position(
        self, connection: IReplicationConnection, cmd: Any
    ) -> HandlerResult:
        return self._record("on_position", connection, cmd)

    def on_user_sync(
        self, connection: IReplicationConnection, cmd: Any
    ) -> HandlerResult:
        return self._record("on_user_sync", connection, cmd)

    def on_clear_user_sync(
        self, connection: IReplicationConnection, cmd: Any
    ) -> HandlerResult:
        return self._record("on_clear_user_sync", connection, cmd)

    def on_federation_ack(
        self, connection: IReplicationConnection, cmd: Any
    ) -> HandlerResult:
        return self._record("on_federation_ack", connection, cmd)

    def on_user_ip(self, connection: IReplicationConnection, cmd: Any) -> HandlerResult:
        return self._record("on_user_ip", connection, cmd)

    def on_remote_server_up(
        self, connection: IReplicationConnection, cmd: Any
    ) -> HandlerResult:
        return self._record("on_remote_server_up", connection, cmd)

    def on_lock_released(
        self, connection: IReplicationConnection, cmd: Any
    ) -> HandlerResult:
        return self._record("on_lock_released", connection, cmd)

    def on_new_active_task(
        self, connection: IReplicationConnection, cmd: Any
    ) -> HandlerResult:
        return self._record("on_new_active_task", connection, cmd)

    def on_cancel_task(
        self, connection: IReplicationConnection, cmd: Any
    ) -> HandlerResult:
        return self._record("on_cancel_task", connection, cmd)


# -- one protocol on a StringTransport


class _Conn:
    """A protocol connected to a StringTransport, with its handler and clock."""

    def __init__(
        self,
        proto: BaseReplicationProtocol,
        handler: _RecordingHandler,
        clock: Clock,
        transport: StringTransport | None = None,
    ) -> None:
        self.proto = proto
        self.handler = handler
        self.clock = clock
        self.transport = StringTransport() if transport is None else transport
        proto.makeConnection(self.transport)

    def feed(self, data: bytes) -> None:
        """Deliver `data` one byte at a time."""
        for i in range(len(data)):
            self.proto.dataReceived(data[i : i + 1])

    def written(self) -> list[bytes]:
        """The lines written so far, without their newlines."""
        data: bytes = self.transport.value()
        assert data == b"" or data.endswith(b"\n"), data
        return data.split(b"\n")[:-1]

    def take(self) -> list[bytes]:
        """The lines written since the last take."""
        lines = self.written()
        self.transport.clear()
        return lines

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


def _server(
    limits: ConnectionLimits = _DEFAULT_LIMITS,
    at: float = 0.0,
    transport: StringTransport | None = None,
) -> _Conn:
    clock = Clock()
    clock.advance(at)
    handler = _RecordingHandler()
    proto = ServerReplicationProtocol(
        clock=clock, handler=handler, server_name=_SERVER, limits=limits
    )
    return _Conn(proto, handler, clock, transport)


def _client(
    limits: ConnectionLimits = _DEFAULT_LIMITS,
    at: float = 0.0,
    on_handshake: Callable[[], object] | None = None,
) -> _Conn:
    clock = Clock()
    clock.advance(at)
    handler = _RecordingHandler()
    proto = ClientReplicationProtocol(
        clock=clock,
        handler=handler,
        server_name=_SERVER,
        instance_name=_WORKER,
        limits=limits,
        on_handshake=on_handshake,
    )
    return _Conn(proto, handler, clock)


def _rdata(token: int, payload: str = "x") -> RdataCommand:
    return RdataCommand("events", "master", token, ["ev", [payload]])


_CLIENT_CONVERSATION: Final = (
    b"NAME worker1\n"
    b"PING 1000\n"
    b"REPLICATE \n"
    b"USER_SYNC worker1 @u:test.local DEV start 1234\n"
    b"FEDERATION_ACK worker1 42\n"
    b"CLEAR_USER_SYNC worker1\n"
)

_SERVER_CONVERSATION: Final = (
    b"SERVER test.local\n"
    b"PING 1000\n"
    b"POSITION events master 1 5\n"
    b'RDATA events master batch ["ev",["a"]]\n'
    b'RDATA events master 6 ["ev",["b"]]\n'
    b"REMOTE_SERVER_UP other.example\n"
)


class FramingTests(SynchronousTestCase):
    """Bytes in, commands out, fed one byte at a time through StringTransport."""

    def test_server_conversation(self) -> None:
        """A client's whole conversation reaches the server's handler in order."""
        conn = _server()
        conn.feed(_CLIENT_CONVERSATION)
        self.assertEqual(
            conn.handler.methods(),
            [
                "new_connection",
                "on_replicate",
                "on_user_sync",
                "on_federation_ack",
                "on_clear_user_sync",
            ],
        )
        self.assertEqual(
            conn.handler.commands("on_user_sync"),
            [UserSyncCommand("worker1", "@u:test.local", "DEV", True, 1234)],
        )
        self.assertEqual(conn.proto.peer_name(), "worker1")
        self.assertFalse(conn.closing)

    def test_client_conversation(self) -> None:
        """A server's whole conversation reaches the client's handler in order."""
        conn = _client()
        conn.feed(_SERVER_CONVERSATION)
        self.assertEqual(
            conn.handler.methods(),
            [
                "new_connection",
                "on_position",
                "on_rdata",
                "on_rdata",
                "on_remote_server_up",
            ],
        )
        self.assertEqual(
            conn.handler.commands("on_rdata"),
            [
                RdataCommand("events", "master", None, ["ev", ["a"]]),
                RdataCommand("events", "master", 6, ["ev", ["b"]]),
            ],
        )
        self.assertEqual(conn.proto.peer_name(), _SERVER)
        self.assertFalse(conn.closing)

    def test_split_anywhere(self) -> None:
        """A conversation split in two at any byte gives the same commands."""
        expected = _server()
        expected.proto.dataReceived(_CLIENT_CONVERSATION)
        want = expected.handler.calls[1:]
        for cut in range(len(_CLIENT_CONVERSATION) + 1):
            conn = _server()
            conn.proto.dataReceived(_CLIENT_CONVERSATION[:cut])
            conn.proto.dataReceived(_CLIENT_CONVERSATION[cut:])
            got = [(m, cmd) for m, _, cmd in conn.handler.calls[1:]]
            self.assertEqual(got, [(m, cmd) for m, _, cmd in want], f"cut at {cut}")

    def test_crlf_accepted(self) -> None:
        """A line ending in CRLF is read as if it ended in LF."""
        conn = _server()
        conn.feed(b"NAME worker1\r\nREPLICATE \r\nFEDERATION_ACK worker1 7\r\n")
        self.assertEqual(conn.proto.peer_name(), "worker1")
        self.assertEqual(
            conn.handler.commands("on_federation_ack"),
            [FederationAckCommand("worker1", 7)],
        )
        self.assertEqual(conn.handler.count("on_replicate"), 1)
        self.assertFalse(conn.closing)

    def test_blank_lines_ignored(self) -> None:
        """Empty and whitespace-only lines are skipped without complaint."""
        conn = _server()
        conn.take()
        conn.feed(b"\n\n   \n\r\n\t \r\nREPLICATE \n\n")
        self.assertEqual(conn.handler.methods(), ["new_connection", "on_replicate"])
        self.assertEqual(conn.take(), [])
        self.assertFalse(conn.closing)

    def test_invalid_utf8(self) -> None:
        """A line that is not UTF-8 gets an ERROR saying so and a close."""
        conn = _server()
        conn.take()
        conn.feed(b"NAME \xff\xfeworker\n")
        [line] = conn.take()
        self.assertTrue(line.startswith(b"ERROR Invalid UTF-8"), line)
        self.assertTrue(conn.closing)
        self.assertEqual(conn.handler.methods(), ["new_connection"])

    def test_unknown_command(self) -> None:
        """An unknown command gets an ERROR naming it and a close."""
        conn = _server()
        conn.take()
        conn.feed(b"FROBNICATE now\n")
        [line] = conn.take()
        self.assertTrue(line.startswith(b"ERROR "), line)
        self.assertIn(b"FROBNICATE", line)
        self.assertTrue(conn.closing)

    def test_malformed_arguments(self) -> None:
        """A known command with bad arguments gets an ERROR naming the command."""
        conn = _client()
        conn.take()
        conn.feed(b"POSITION events master one 5\n")
        [line] = conn.take()
        self.assertTrue(line.startswith(b"ERROR Invalid POSITION command"), line)
        self.assertIn(b"one", line)
        self.assertTrue(conn.closing)
        self.assertEqual(conn.handler.count("on_position"), 0)

    def test_line_too_long(self) -> None:
        """A line growing past the limit gets an ERROR with the limit and a close."""
        conn = _server(ConnectionLimits(max_line_length=100, max_pending_bytes=1000))
        conn.take()
        conn.feed(b"NAME " + b"w" * 200)
        [line] = conn.take()
        self.assertEqual(line, b"ERROR Line too long: over 100 bytes")
        self.assertTrue(conn.closing)

    def test_over_long_line_not_kept(self) -> None:
        """The bytes of an over-long line are dropped, not held until the close."""
        conn = _server(ConnectionLimits(max_line_length=100, max_pending_bytes=1000))
        conn.feed(b"NAME " + b"w" * 200)
        conn.proto.dataReceived(b"w" * 10_000)
        # LineOnlyReceiver's buffer is where a peer's unterminated bytes pile up.
        self.assertLessEqual(len(conn.proto._buffer), 100)

    def test_complete_line_too_long(self) -> None:
        """A whole over-long line arriving in one chunk is refused too."""
        conn = _server(ConnectionLimits(max_line_length=100, max_pending_bytes=1000))
        conn.take()
        conn.proto.dataReceived(b"NAME " + b"w" * 100 + b"\nREPLICATE \n")
        self.assertEqual(conn.take(), [b"ERROR Line too long: over 100 bytes"])
        self.assertEqual(conn.handler.count("on_replicate"), 0)

    def test_line_at_limit_accepted(self) -> None:
        """A line exactly at the limit is accepted."""
        conn = _server(ConnectionLimits(max_line_length=100, max_pending_bytes=1000))
        name = "w" * 95
        conn.feed(f"NAME {name}\n".encode())
        self.assertEqual(conn.proto.peer_name(), name)
        self.assertFalse(conn.closing)

    def test_server_command_from_client(self) -> None:
        """A client sending RDATA gets an ERROR naming RDATA and a close."""
        conn = _server()
        conn.take()
        conn.feed(b'RDATA events master 1 ["ev",[]]\n')
        self.assertEqual(
            conn.take(), [b"ERROR RDATA is not a command a client may send"]
        )
        self.assertTrue(conn.closing)
        self.assertEqual(conn.handler.count("on_rdata"), 0)

    def test_client_command_from_server(self) -> None:
        """A server sending NAME gets an ERROR naming NAME and a close."""
        conn = _client()
        conn.take()
        conn.feed(b"NAME impostor\n")
        self.assertEqual(
            conn.take(), [b"ERROR NAME is not a command a server may send"]
        )
        self.assertTrue(conn.closing)
        self.assertIsNone(conn.proto.peer_name())

    def test_redis_only_command_refused(self) -> None:
        """NEW_ACTIVE_TASK, which only travels over Redis, is refused over TCP."""
        conn = _client()
        conn.take()
        conn.feed(b"NEW_ACTIVE_TASK t1\n")
        self.assertEqual(
            conn.take(), [b"ERROR NEW_ACTIVE_TASK is not a command a server may send"]
        )
        self.assertEqual(conn.handler.count("on_new_active_task"), 0)

    def test_nothing_after_fatal_line_in_same_chunk(self) -> None:
        """Lines after a fatal one in the same chunk are not dispatched."""
        conn = _server()
        conn.proto.dataReceived(b"REPLICATE \nBOGUS\nREPLICATE \nNAME late\n")
        self.assertEqual(conn.handler.count("on_replicate"), 1)
        self.assertIsNone(conn.proto.peer_name())
        self.assertTrue(conn.closing)

    def test_nothing_after_close(self) -> None:
        """Once closing, later bytes are not dispatched even on a lax transport."""
        conn = _server()
        conn.proto.close()
        # Undo the flag LineOnlyReceiver checks, to test the protocol's own guard.
        conn.transport.disconnecting = False
        conn.feed(b"REPLICATE \nNAME late\n")
        self.assertEqual(conn.handler.methods(), ["new_connection"])

    def test_peer_error_logged_not_closed(self) -> None:
        """An ERROR from the peer is logged and the connection stays open."""
        conn = _server()
        conn.take()
        with capturedLogs() as events:
            conn.feed(b"ERROR something broke\n")
        self.assertFalse(conn.closing)
        self.assertEqual(conn.take(), [])
        self.assertIn("something broke", [e.get("text") for e in events])


class HandshakeTests(SynchronousTestCase):
    """What each side says first, and what the other checks."""

    def test_server_greeting(self) -> None:
        """The server writes exactly SERVER then PING with its clock in ms."""
        conn = _server(at=12.345)
        self.assertEqual(conn.transport.value(), b"SERVER test.local\nPING 12345\n")
        self.assertEqual(conn.handler.methods(), ["new_connection"])
        self.assertIs(conn.handler.calls[0][1], conn.proto)

    def test_client_greeting(self) -> None:
        """The client writes exactly NAME, PING and REPLICATE, in that order."""
        conn = _client(at=12.345)
        self.assertEqual(
            conn.transport.value(), b"NAME worker1\nPING 12345\nREPLICATE \n"
        )
        self.assertEqual(conn.handler.methods(), ["new_connection"])

    def test_wrong_server_name(self) -> None:
        """A SERVER with another name gets an ERROR naming both, and a close."""
        handshakes: list[None] = []
        conn = _client(on_handshake=lambda: handshakes.append(None))
        conn.take()
        conn.feed(b"SERVER elsewhere.example\n")
        [line] = conn.take()
        self.assertTrue(line.startswith(b"ERROR Wrong remote"), line)
        self.assertIn(b"'test.local'", line)
        self.assertIn(b"'elsewhere.example'", line)
        self.assertTrue(conn.closing)
        self.assertEqual(handshakes, [])

    def test_right_server_name(self) -> None:
        """The expected SERVER completes the handshake and names the peer."""
        handshakes: list[None] = []
        conn = _client(on_handshake=lambda: handshakes.append(None))
        conn.feed(b"SERVER test.local\n")
        self.assertEqual(handshakes, [None])
        self.assertEqual(conn.proto.peer_name(), _SERVER)
        self.assertFalse(conn.closing)

    def test_describe(self) -> None:
        """describe() names transport, side, peer address and peer name."""
        conn = _server()
        self.assertEqual(
            conn.proto.describe(), "tcp server 192.168.1.1:54321 (unnamed)"
        )
        conn.feed(b"NAME worker1\n")
        self.assertEqual(conn.proto.describe(), "tcp server 192.168.1.1:54321 worker1")

    def test_provides_interfaces(self) -> None:
        """Both sides provide IReplicationConnection and IPushProducer."""
        for conn in (_server(), _client()):
            self.assertTrue(verifyObject(IReplicationConnection, conn.proto))
            self.assertTrue(verifyObject(IPushProducer, conn.proto))
        self.assertTrue(verifyObject(IReplicationCommandHandler, _RecordingHandler()))

    def test_registers_as_streaming_producer(self) -> None:
        """The protocol registers itself with its transport as a push producer."""
        conn = _server()
        self.assertIs(conn.transport.producer, conn.proto)
        self.assertTrue(conn.transport.streaming)

    def test_lost_connection_pairs_new_connection(self) -> None:
        """connectionLost tells the handler once, after new_connection."""
        conn = _server()
        conn.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(conn.handler.methods(), ["new_connection", "lost_connection"])
        self.assertIs(conn.handler.calls[1][1], conn.proto)

    def test_no_lost_connection_without_new_connection(self) -> None:
        """A protocol that never connected does not report a lost connection."""
        handler = _RecordingHandler()
        proto = ServerReplicationProtocol(
            clock=Clock(), handler=handler, server_name=_SERVER
        )
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(handler.calls, [])

    def test_send_after_close_dropped(self) -> None:
        """Commands sent once closing are dropped without error."""
        conn = _server()
        conn.proto.close()
        conn.take()
        conn.proto.send_command(_rdata(1))
        self.assertEqual(conn.take(), [])


class KeepaliveTests(SynchronousTestCase):
    """PINGs every 5 s of silence; a 25 s timeout once the peer has pinged."""

    def test_ping_after_five_seconds(self) -> None:
        """A PING goes out after exactly 5 s of silence and not before."""
        conn = _server()
        conn.take()
        conn.clock.advance(4.999)
        self.assertEqual(conn.take(), [])
        conn.clock.advance(0.001)
        self.assertEqual(conn.take(), [b"PING 5000"])

    def test_sending_postpones_ping(self) -> None:
        """Any command sent restarts the 5 s count."""
        conn = _server()
        conn.clock.advance(3)
        conn.proto.send_command(_rdata(1))
        conn.take()
        conn.clock.advance(4.999)
        self.assertEqual(conn.take(), [])
        conn.clock.advance(0.001)
        self.assertEqual(conn.take(), [b"PING 8000"])

    def test_never_silent_over_five_seconds(self) -> None:
        """Whatever else is sent, the gap between two lines never exceeds 5 s."""
        conn = _server()
        # Steps of 1/8 s, exact in binary, so the clock lands on every deadline.
        sends = {13, 71, 72, 160, 333, 401}
        last_write = 0.0
        biggest_gap = 0.0
        for step in range(1, 480):
            conn.clock.advance(0.125)
            if step in sends:
                conn.proto.send_command(_rdata(step))
            if conn.take():
                now = conn.clock.seconds()
                biggest_gap = max(biggest_gap, now - last_write)
                last_write = now
        self.assertLessEqual(biggest_gap, PING_INTERVAL_MS / 1000 + 1e-6)
        self.assertGreater(last_write, 55)

    def test_no_timeout_before_peer_pings(self) -> None:
        """A peer that never pinged is not timed out, however quiet."""
        conn = _server()
        conn.clock.pump([1.0] * 120)
        self.assertFalse(conn.closing)

    def test_timeout_after_peer_ping(self) -> None:
        """25 s without a byte after the peer's PING closes with ERROR ping timeout."""
        conn = _server()
        conn.feed(b"PING 0\n")
        conn.clock.pump([1.0] * 24 + [0.999])
        self.assertFalse(conn.closing)
        conn.take()
        conn.clock.advance(0.001)
        self.assertEqual(conn.take(), [b"ERROR ping timeout"])
        self.assertTrue(conn.closing)
        self.assertEqual(PING_TIMEOUT_MS, 25_000)

    def test_timeout_between_our_pings(self) -> None:
        """The timeout is exact even when it falls between two of our PINGs."""
        conn = _server()
        conn.clock.advance(2.5)
        conn.feed(b"PING 2500\n")
        conn.clock.pump([0.5] * 49 + [0.499])
        self.assertFalse(conn.closing)
        conn.clock.advance(0.001)
        self.assertTrue(conn.closing)

    def test_traffic_resets_timeout(self) -> None:
        """Any line from the peer restarts its 25 s allowance."""
        conn = _server()
        conn.feed(b"PING 0\n")
        conn.clock.advance(20)
        conn.feed(b"\n")
        conn.clock.pump([1.0] * 24 + [0.999])
        self.assertFalse(conn.closing)
        conn.clock.advance(0.001)
        self.assertTrue(conn.closing)

    def test_close_aborts_after_timeout(self) -> None:
        """A close the peer does not complete is aborted after close_timeout."""
        conn = _server(ConnectionLimits(close_timeout=3))
        conn.proto.close()
        conn.clock.advance(2.999)
        self.assertFalse(conn.transport.disconnected)
        conn.clock.advance(0.001)
        self.assertTrue(conn.transport.disconnected)

    def test_connection_lost_cancels_timers(self) -> None:
        """Once the connection is lost no timer is left behind."""
        conn = _server()
        conn.feed(b"PING 0\n")
        conn.proto.close()
        conn.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(conn.clock.getDelayedCalls(), [])

    def test_idle_connection_stays_up(self) -> None:
        """Two idle peers keep each other alive with PINGs for minutes."""
        clock = Clock()
        server_handler, client_handler = _RecordingHandler(), _RecordingHandler()
        _, _, pump = connectedServerAndClient(
            lambda: ServerReplicationProtocol(
                clock=clock, handler=server_handler, server_name=_SERVER
            ),
            lambda: ClientReplicationProtocol(
                clock=clock,
                handler=client_handler,
                server_name=_SERVER,
                instance_name=_WORKER,
            ),
        )
        for _ in range(600):
            clock.advance(1)
            pump.flush()
        self.assertEqual(server_handler.count("lost_connection"), 0)
        self.assertEqual(client_handler.count("lost_connection"), 0)


class _HookedTransport(StringTransport):
    """Runs `on_write` after every write: to pause the producer mid-flush, as
    a TCP transport does when its buffer fills, or to re-enter the protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.on_write: Callable[[], None] | None = None

    def writeSequence(self, data: Iterable[bytes]) -> None:
        super().writeSequence(data)
        if self.on_write is not None:
            self.on_write()


def _sent_tokens(lines: list[bytes]) -> list[int]:
    return [int(line.split(b" ")[3]) for line in lines if line.startswith(b"RDATA")]


class BackpressureTests(SynchronousTestCase):
    """While paused, commands queue within bounds; past them, the peer is dropped."""

    def test_paused_commands_queue_then_flush_in_order(self) -> None:
        """Nothing is written while paused; resuming writes it all in order."""
        conn = _server()
        conn.take()
        conn.proto.pauseProducing()
        for token in range(1, 11):
            conn.proto.send_command(_rdata(token))
        self.assertEqual(conn.take(), [])
        self.assertEqual(conn.proto.pending_commands, 10)
        conn.proto.resumeProducing()
        self.assertEqual(_sent_tokens(conn.take()), list(range(1, 11)))
        self.assertEqual(
            (conn.proto.pending_commands, conn.proto.pending_bytes), (0, 0)
        )

    def test_repause_during_flush(self) -> None:
        """A transport pausing again mid-flush stops the flush; order still holds."""
        transport = _HookedTransport()
        conn = _server(transport=transport)
        conn.take()
        conn.proto.pauseProducing()
        for token in range(1, 6):
            conn.proto.send_command(_rdata(token))
        writes: list[None] = []

        def pause_after_two() -> None:
            writes.append(None)
            if len(writes) == 2:
                conn.proto.pauseProducing()

        transport.on_write = pause_after_two
        conn.proto.resumeProducing()
        self.assertEqual(_sent_tokens(conn.take()), [1, 2])
        conn.proto.send_command(_rdata(6))
        self.assertEqual(conn.take(), [])
        self.assertEqual(conn.proto.pending_commands, 4)
        conn.proto.resumeProducing()
        self.assertEqual(_sent_tokens(conn.take()), [3, 4, 5, 6])

    def test_send_during_flush_goes_behind_queue(self) -> None:
        """A command sent while the queue is being flushed is written after it."""
        transport = _HookedTransport()
        conn = _server(transport=transport)
        conn.take()
        conn.proto.pauseProducing()
        for token in range(1, 4):
            conn.proto.send_command(_rdata(token))

        def send_once() -> None:
            transport.on_write = None
            conn.proto.send_command(_rdata(4))

        transport.on_write = send_once
        conn.proto.resumeProducing()
        self.assertEqual(_sent_tokens(conn.take()), [1, 2, 3, 4])

    def test_count_bound(self) -> None:
        """One command past the count bound: ERROR Failed to keep up and close."""
        conn = _server(ConnectionLimits(max_pending_commands=5))
        conn.take()
        conn.proto.pauseProducing()
        for token in range(1, 6):
            conn.proto.send_command(_rdata(token))
            self.assertLessEqual(conn.proto.pending_commands, 5)
        self.assertFalse(conn.closing)
        conn.proto.send_command(_rdata(6))
        self.assertEqual(conn.take(), [b"ERROR Failed to keep up"])
        self.assertTrue(conn.closing)
        self.assertEqual(
            (conn.proto.pending_commands, conn.proto.pending_bytes), (0, 0)
        )

    def test_bytes_bound(self) -> None:
        """One line past the byte bound: ERROR Failed to keep up and close."""
        limits = ConnectionLimits(max_line_length=200, max_pending_bytes=1000)
        conn = _server(limits)
        conn.take()
        conn.proto.pauseProducing()
        cmd = _rdata(1, "y" * 120)
        size = len(b"RDATA events master 1 " + b'["ev",["' + b"y" * 120 + b'"]]')
        fits = 1000 // size
        for _ in range(fits):
            conn.proto.send_command(cmd)
            self.assertLessEqual(conn.proto.pending_bytes, 1000)
        self.assertEqual(conn.proto.pending_bytes, fits * size)
        self.assertFalse(conn.closing)
        conn.proto.send_command(cmd)
        self.assertEqual(conn.take(), [b"ERROR Failed to keep up"])
        self.assertTrue(conn.closing)
        self.assertEqual(conn.proto.pending_bytes, 0)

    def test_overflow_aborts_if_peer_never_reads(self) -> None:
        """After Failed to keep up the connection is aborted if the close stalls."""
        conn = _server(ConnectionLimits(max_pending_commands=1, close_timeout=2))
        conn.proto.pauseProducing()
        conn.proto.send_command(_rdata(1))
        conn.proto.send_command(_rdata(2))
        self.assertTrue(conn.closing)
        conn.clock.advance(2)
        self.assertTrue(conn.transport.disconnected)

    def test_stop_producing_closes(self) -> None:
        """stopProducing from the transport closes the connection."""
        conn = _server()
        conn.proto.stopProducing()
        self.assertTrue(conn.closing)

    def test_protocol_error_skips_queue(self) -> None:
        """A protocol ERROR is written at once even while paused."""
        conn = _server()
        conn.take()
        conn.proto.pauseProducing()
        conn.proto.send_command(_rdata(1))
        conn.feed(b"BOGUS\n")
        [line] = conn.take()
        self.assertTrue(line.startswith(b"ERROR "), line)
        self.assertTrue(conn.closing)

    def test_oversized_command_dropped(self) -> None:
        """A command other than RDATA over the line limit is dropped; the connection lives on."""
        conn = _server(ConnectionLimits(max_line_length=100, max_pending_bytes=1000))
        conn.take()
        conn.proto.send_command(RemoteServerUpCommand("z" * 200))
        conn.proto.send_command(_rdata(2))
        self.assertEqual(_sent_tokens(conn.take()), [2])
        self.assertFalse(conn.closing)

    def test_oversized_rdata_closes(self) -> None:
        """An RDATA over the line limit closes with ERROR and nothing after it is sent, so the reader catches its row up."""
        # Found by tests/torture: dropping the line let the next RDATA move
        # every reader past the row.
        conn = _server(ConnectionLimits(max_line_length=100, max_pending_bytes=1000))
        conn.take()
        conn.proto.send_command(_rdata(1, "z" * 200))
        conn.proto.send_command(_rdata(2))
        [line] = conn.take()
        self.assertTrue(line.startswith(b"ERROR RDATA of "), line)
        self.assertTrue(conn.closing)

    def test_unencodable_command_logged(self) -> None:
        """A command that cannot be encoded is logged and dropped, not fatal."""
        conn = _server()
        conn.take()
        conn.proto.send_command(RdataCommand("two words", "master", 1, []))
        self.assertEqual(len(self.flushLoggedErrors(CommandEncodeError)), 1)
        self.assertEqual(conn.take(), [])
        self.assertFalse(conn.closing)


def _pair(
    clock: Clock | None = None,
) -> tuple[
    ServerReplicationProtocol,
    _RecordingHandler,
    ClientReplicationProtocol,
    _RecordingHandler,
    IOPump,
]:
    """A server and a client protocol connected in memory, handshake done."""
    clock = Clock() if clock is None else clock
    server_handler, client_handler = _RecordingHandler(), _RecordingHandler()
    client, server, pump = connectedServerAndClient(
        lambda: ServerReplicationProtocol(
            clock=clock, handler=server_handler, server_name=_SERVER
        ),
        lambda: ClientReplicationProtocol(
            clock=clock,
            handler=client_handler,
            server_name=_SERVER,
            instance_name=_WORKER,
        ),
    )
    return server, server_handler, client, client_handler, pump


class ConversationTests(SynchronousTestCase):
    """A server and a client talking through iosim's in-memory transports."""

    def test_handshake(self) -> None:
        """After the handshake both sides know each other and the server got REPLICATE."""
        server, server_handler, client, client_handler, _ = _pair()
        self.assertEqual(server.peer_name(), _WORKER)
        self.assertEqual(client.peer_name(), _SERVER)
        self.assertEqual(server_handler.methods(), ["new_connection", "on_replicate"])
        self.assertIs(server_handler.connections("on_replicate")[0], server)
        self.assertEqual(client_handler.methods(), ["new_connection"])

    def test_rows_and_positions_in_order(self) -> None:
        """POSITION and RDATA reach the client's handler in the order sent."""
        server, _, client, client_handler, pump = _pair()
        sent: list[Command] = [PositionCommand("events", "master", 0, 3)]
        sent += [_rdata(token) for token in range(4, 200)]
        sent.append(PositionCommand("events", "master", 199, 250))
        for cmd in sent:
            server.send_command(cmd)
        pump.flush()
        received = [
            cmd
            for m, _, cmd in client_handler.calls
            if m in ("on_rdata", "on_position")
        ]
        self.assertEqual(received, sent)
        self.assertIs(client_handler.connections("on_rdata")[0], client)

    def test_client_commands_reach_server(self) -> None:
        """Commands a client sends reach the server's handler."""
        _, server_handler, client, _, pump = _pair()
        client.send_command(ClearUserSyncCommand(_WORKER))
        client.send_command(RemoteServerUpCommand("other.example"))
        pump.flush()
        self.assertEqual(
            server_handler.methods()[-2:], ["on_clear_user_sync", "on_remote_server_up"]
        )

    def test_failing_coroutine_logged(self) -> None:
        """A handler coroutine that fails is logged; the connection stays up."""
        clock = Clock()
        server_handler = _RecordingHandler()

        async def boom() -> None:
            raise ValueError("handler broke")

        server_handler.results["on_user_sync"] = boom
        client_handler = _RecordingHandler()
        client, _, pump = connectedServerAndClient(
            lambda: ServerReplicationProtocol(
                clock=clock, handler=server_handler, server_name=_SERVER
            ),
            lambda: ClientReplicationProtocol(
                clock=clock,
                handler=client_handler,
                server_name=_SERVER,
                instance_name=_WORKER,
            ),
        )
        client.send_command(UserSyncCommand(_WORKER, "@u:x", None, True, 1))
        client.send_command(FederationAckCommand(_WORKER, 3))
        pump.flush()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(server_handler.count("on_federation_ack"), 1)
        self.assertEqual(server_handler.count("lost_connection"), 0)

    def test_failing_deferred_logged(self) -> None:
        """A handler Deferred that fails is logged; the connection stays up."""
        server, _, _, client_handler, pump = _pair()
        client_handler.results["on_rdata"] = lambda: fail(RuntimeError("nope"))
        server.send_command(_rdata(1))
        server.send_command(_rdata(2))
        pump.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(client_handler.count("on_rdata"), 2)
        self.assertEqual(client_handler.count("lost_connection"), 0)

    def test_close_reaches_both_handlers(self) -> None:
        """Closing one side makes both handlers forget the connection."""
        server, server_handler, client, client_handler, pump = _pair()
        server.close()
        pump.flush()
        self.assertEqual(server_handler.connections("lost_connection"), [server])
        self.assertEqual(client_handler.connections("lost_connection"), [client])

    def test_server_factory_tracks_connections(self) -> None:
        """The server factory lists live connections and forgets lost ones."""
        factory = ReplicationServerFactory(
            clock=Clock(), handler=_RecordingHandler(), server_name=_SERVER
        )
        view = factory.connections
        first = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        second = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
        first.makeConnection(StringTransport())
        second.makeConnection(StringTransport())
        self.assertEqual(list(view), [first, second])
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(list(view), [second])


@implementer(IConnector)
class _FakeConnector:
    """Counts connection attempts; the test reports their outcome."""

    def __init__(self) -> None:
        self.attempts = 0
        self.stopped_connecting = False

    def connect(self) -> None:
        self.attempts += 1

    def disconnect(self) -> None:
        pass

    def stopConnecting(self) -> None:
        self.stopped_connecting = True

    def getDestination(self) -> IAddress:
        return IPv4Address("TCP", "127.0.0.1", 9092)


class ReconnectTests(SynchronousTestCase):
    """The client factory's backoff, driven by a Clock."""

    def _factory(
        self,
        rand: Callable[[], float],
        backoff: Backoff = _DEFAULT_BACKOFF,
    ) -> tuple[ReplicationClientFactory, Clock, _FakeConnector]:
        clock = Clock()
        factory = ReplicationClientFactory(
            clock=clock,
            handler=_RecordingHandler(),
            server_name=_SERVER,
            instance_name=_WORKER,
            backoff=backoff,
            rand=rand,
        )
        return factory, clock, _FakeConnector()

    def _fail_and_wait(
        self, factory: ReplicationClientFactory, clock: Clock, connector: _FakeConnector
    ) -> float:
        """Report a failed attempt; return the delay before the next one."""
        attempts = connector.attempts
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        [call] = clock.getDelayedCalls()
        delay = call.getTime() - clock.seconds()
        clock.advance(delay)
        self.assertEqual(connector.attempts, attempts + 1)
        return delay

    def test_delays_grow_up_to_maximum(self) -> None:
        """Without jitter the delays double from initial up to maximum."""
        factory, clock, connector = self._factory(lambda: 0.0)
        delays = [self._fail_and_wait(factory, clock, connector) for _ in range(8)]
        self.assertEqual(delays, [1, 2, 4, 8, 16, 30, 30, 30])

    def test_delays_have_jitter(self) -> None:
        """With jitter each delay falls in [base*(1-jitter), base] and still grows."""
        factory, clock, connector = self._factory(random.Random(1234).random)
        delays = [self._fail_and_wait(factory, clock, connector) for _ in range(5)]
        bases = [1, 2, 4, 8, 16]
        for delay, base in zip(delays, bases, strict=True):
            self.assertTrue(base * 0.75 <= delay <= base, (delay, base))
        self.assertNotEqual(delays, bases)
        self.assertEqual(delays, sorted(delays))

    def test_same_failure_different_delays(self) -> None:
        """Two clients failing together do not retry at the same moment."""
        first = self._fail_and_wait(*self._factory(lambda: 0.1))
        second = self._fail_and_wait(*self._factory(lambda: 0.9))
        self.assertNotEqual(first, second)

    def test_reset_after_handshake(self) -> None:
        """A connection that completes its handshake resets the delays."""
        factory, clock, connector = self._factory(lambda: 0.0)
        for _ in range(3):
            self._fail_and_wait(factory, clock, connector)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9092))
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"SERVER test.local\n")
        proto.connectionLost(Failure(ConnectionDone()))
        factory.clientConnectionLost(connector, Failure(ConnectionDone()))
        [call] = clock.getDelayedCalls()
        self.assertEqual(call.getTime() - clock.seconds(), 1.0)

    def test_no_reset_on_wrong_server(self) -> None:
        """A connection to the wrong server does not reset the delays."""
        factory, clock, connector = self._factory(lambda: 0.0)
        for _ in range(3):
            self._fail_and_wait(factory, clock, connector)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9092))
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"SERVER impostor\n")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self._fail_and_wait(factory, clock, connector), 8.0)

    def test_stop_trying_cancels_retry(self) -> None:
        """stopTrying cancels a pending retry and prevents any later one."""
        factory, clock, connector = self._factory(lambda: 0.0)
        factory.startedConnecting(connector)
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        factory.stopTrying()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertTrue(connector.stopped_connecting)
        factory.clientConnectionLost(connector, Failure(ConnectionDone()))
        clock.advance(100)
        self.assertEqual(connector.attempts, 0)

    def test_reset_does_not_undo_stop(self) -> None:
        """A handshake completing after stopTrying does not restart reconnection."""
        factory, clock, connector = self._factory(lambda: 0.0)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9092))
        proto.makeConnection(StringTransport())
        factory.stopTrying()
        proto.dataReceived(b"SERVER test.local\n")
        proto.connectionLost(Failure(ConnectionDone()))
        factory.clientConnectionLost(connector, Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_helpers_bind_loopback(self) -> None:
        """listen_replication binds 127.0.0.1 unless told otherwise."""
        reactor = MemoryReactorClock()
        factory = ReplicationServerFactory(
            clock=reactor, handler=_RecordingHandler(), server_name=_SERVER
        )
        listen_replication(reactor, 9092, factory)
        self.assertEqual(reactor.tcpServers[0][3], "127.0.0.1")
        client_factory, _, _ = self._factory(lambda: 0.0)
        connect_replication_client(reactor, "127.0.0.1", 9092, client_factory)
        self.assertEqual(reactor.tcpClients[0][:3], ("127.0.0.1", 9092, client_factory))


# -- real sockets on 127.0.0.1


class _RawClient(Protocol):
    """A plain TCP client: records what it receives and when it is closed."""

    def __init__(self) -> None:
        self.received = b""
        self.made: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class _RawFactory(ClientFactory[_RawClient]):
    def __init__(self, proto: _RawClient) -> None:
        self.proto = proto

    def buildProtocol(self, addr: IAddress | None) -> _RawClient:
        return self.proto


class RealTCPTests(TestCase):
    """Server and clients over real loopback sockets with the global reactor."""

    timeout = 30

    def setUp(self) -> None:
        self.server_handler = _RecordingHandler()
        self._clients: list[
            tuple[ReplicationClientFactory, IConnector, _RecordingHandler]
        ] = []

    def _listen(self, limits: ConnectionLimits = _DEFAULT_LIMITS) -> int:
        self.server_factory = ReplicationServerFactory(
            clock=_time_reactor,
            handler=self.server_handler,
            server_name=_SERVER,
            limits=limits,
        )
        port = listen_replication(_tcp_reactor, 0, self.server_factory)
        self.addCleanup(self._shutdown, port)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        self.assertEqual(address.host, "127.0.0.1")
        return address.port

    def _connect(
        self,
        port: int,
        name: str,
        backoff: Backoff = _DEFAULT_BACKOFF,
    ) -> _RecordingHandler:
        handler = _RecordingHandler()
        factory = ReplicationClientFactory(
            clock=_time_reactor,
            handler=handler,
            server_name=_SERVER,
            instance_name=name,
            backoff=backoff,
        )
        connector = connect_replication_client(_tcp_reactor, "127.0.0.1", port, factory)
        self._clients.append((factory, connector, handler))
        return handler

    async def _shutdown(self, port: IListeningPort) -> None:
        for factory, connector, _ in self._clients:
            factory.stopTrying()
            connector.disconnect()
        for _, _, handler in self._clients:
            await handler.wait_for(handler.all_lost)
        for conn in list(self.server_factory.connections):
            conn.close()
        await self.server_handler.wait_for(lambda: not self.server_factory.connections)
        stopped = port.stopListening()
        if stopped is not None:
            await stopped

    def _server_conn(self, name: str) -> ServerReplicationProtocol:
        [conn] = [c for c in self.server_factory.connections if c.peer_name() == name]
        return conn

    async def _replicating(self, count: int) -> None:
        """Wait until `count` clients have completed their handshake."""
        await self.server_handler.wait_for(
            lambda: self.server_handler.count("on_replicate") >= count
        )

    async def test_handshake(self) -> None:
        """A client connects, names itself and asks to replicate."""
        port = self._listen()
        client_handler = self._connect(port, _WORKER)
        await self._replicating(1)
        conn = self._server_conn(_WORKER)
        self.assertTrue(
            conn.describe().startswith("tcp server 127.0.0.1:"), conn.describe()
        )
        # Anything the server sends now arrives after its SERVER line.
        conn.send_command(PositionCommand("events", "master", 1, 1))
        await client_handler.wait_for(lambda: client_handler.count("on_position") == 1)
        [client] = client_handler.connections("new_connection")
        self.assertEqual(client.peer_name(), _SERVER)
        self.assertTrue(client.describe().startswith("tcp client 127.0.0.1:"))

    async def test_thousands_of_rows_in_order(self) -> None:
        """Thousands of RDATA lines arrive complete and in order."""
        port = self._listen()
        client_handler = self._connect(port, _WORKER)
        await self._replicating(1)
        conn = self._server_conn(_WORKER)
        sent = [_rdata(token, f"row {token}") for token in range(1, 5001)]
        for cmd in sent:
            conn.send_command(cmd)
        await client_handler.wait_for(
            lambda: client_handler.count("on_rdata") == len(sent)
        )
        self.assertEqual(client_handler.commands("on_rdata"), sent)

    async def test_garbage_closes_only_its_connection(self) -> None:
        """A connection sending garbage is closed; another keeps being served."""
        port = self._listen()
        good = self._connect(port, "good")
        await self._replicating(1)
        raw = _RawClient()
        _tcp_reactor.connectTCP("127.0.0.1", port, _RawFactory(raw))
        await raw.made
        assert raw.transport is not None
        raw.transport.write(b"\xff\xfe\xfd garbage\n")
        await raw.lost
        self.assertTrue(
            raw.received.startswith(b"SERVER test.local\nPING "), raw.received
        )
        self.assertIn(b"\nERROR Invalid UTF-8", raw.received)
        await self.server_handler.wait_for(
            lambda: len(self.server_factory.connections) == 1
        )
        self._server_conn("good").send_command(_rdata(7))
        await good.wait_for(lambda: good.count("on_rdata") == 1)
        self.assertEqual(good.count("lost_connection"), 0)

    async def test_stalled_reader_dropped(self) -> None:
        """A client that stops reading is dropped at the queue bound; others survive."""
        limits = ConnectionLimits(
            max_pending_commands=64,
            max_pending_bytes=4 * 1024 * 1024,
            close_timeout=0.2,
        )
        port = self._listen(limits)
        stalled_handler = self._connect(port, "stalled")
        healthy_handler = self._connect(port, "healthy")
        await self._replicating(2)
        stalled, healthy = self._server_conn("stalled"), self._server_conn("healthy")
        [stalled_client] = stalled_handler.connections("new_connection")
        assert isinstance(stalled_client, ClientReplicationProtocol)
        IPushProducer(stalled_client.transport).pauseProducing()

        big_row = "b" * 8000
        sent_to_healthy: list[Command] = []
        most_pending = [0, 0]

        def tick() -> None:
            for _ in range(32):
                stalled.send_command(_rdata(1, big_row))
                most_pending[0] = max(most_pending[0], stalled.pending_commands)
                most_pending[1] = max(most_pending[1], stalled.pending_bytes)
            cmd = _rdata(len(sent_to_healthy) + 1)
            sent_to_healthy.append(cmd)
            healthy.send_command(cmd)

        loop = LoopingCall(tick)
        loop.clock = _time_reactor
        loop.start(0)

        def stop_loop() -> None:
            if loop.running:
                loop.stop()

        self.addCleanup(stop_loop)
        with capturedLogs() as events:
            await self.server_handler.wait_for(
                lambda: stalled in self.server_handler.connections("lost_connection")
            )
        stop_loop()

        self.assertIn(
            "Failed to keep up",
            [e.get("reason") for e in events if e.get("conn") == stalled.describe()],
        )
        self.assertLessEqual(most_pending[0], 64)
        self.assertLessEqual(most_pending[1], 4 * 1024 * 1024)
        self.assertNotIn(stalled, self.server_factory.connections)
        self.assertIn(healthy, self.server_factory.connections)
        await healthy_handler.wait_for(
            lambda: healthy_handler.count("on_rdata") == len(sent_to_healthy)
        )
        self.assertEqual(healthy_handler.commands("on_rdata"), sent_to_healthy)
        healthy.send_command(_rdata(10**6))
        await healthy_handler.wait_for(
            lambda: healthy_handler.count("on_rdata") == len(sent_to_healthy) + 1
        )

    async def test_client_reconnects(self) -> None:
        """After the server drops it, the client factory connects again."""
        port = self._listen()
        client_handler = self._connect(
            port, _WORKER, Backoff(initial=0.05, maximum=0.5)
        )
        await self._replicating(1)
        self._server_conn(_WORKER).close()
        await self._replicating(2)
        self.assertEqual(client_handler.count("new_connection"), 2)
        self.assertEqual(client_handler.count("lost_connection"), 1)
        self.assertEqual(len(self.server_factory.connections), 1)
