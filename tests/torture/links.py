"""Connections the torture suite can hurt, and a clock it can throw forward.

- `MemoryLink`: a connection between a server and a client protocol in memory,
  with backpressure like a real socket's (a reader that stops reading fills
  the writer's buffer, and the writer's transport pauses its producer) and
  bytes delivered in chunks of random sizes.
- `ProtocolProbe`: attached to every replication protocol the suite builds,
  over TCP or in memory. It records the high-water marks of the send queue
  (`BoundsMonitor`) and can cut the connection after N more bytes, or in the
  middle of the line after a ``batch`` row.
- `JumpingClock`: a `Clock` that follows real time and can jump forward.
- `shrink_socket_buffers`: small kernel buffers, so that a reader that stops
  reading makes its writer's queue fill with a few hundred rows, not megabytes.
"""

from __future__ import annotations

import random
import re
import socket
from collections.abc import Callable
from typing import Any, Final, Literal

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.task import Clock, LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from synapse_replication.tcp import BaseReplicationProtocol

_log: Final = Logger(namespace="tests.torture.links")

# Kernel buffers of the suite's TCP sockets, and the user-space buffer above
# which a Twisted transport pauses its producer (64 KiB by default).
SOCKET_BUFFER_BYTES: Final = 8 * 1024
TRANSPORT_BUFFER_BYTES: Final = 8 * 1024


def override(obj: object, name: str, replacement: Callable[..., Any]) -> None:
    """Replace one method of one object (the probes wrap protocol methods)."""
    setattr(obj, name, replacement)


def shrink_socket_buffers(transport: Any) -> None:
    """Small kernel buffers and a small user-space buffer on a TCP transport
    (anything else is left alone)."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return
    handle = get_handle()
    if not isinstance(handle, socket.socket):
        return
    handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    transport.bufferSize = TRANSPORT_BUFFER_BYTES


# -- bounds


@attrs.define
class BoundsMonitor:
    """High-water marks of what the suite must keep bounded, with the bound
    each one must stay under."""

    max_pending_commands: int = 0
    max_pending_bytes: int = 0
    max_handler_queue: int = 0
    max_pending_batch: int = 0
    max_redis_queue: int = 0
    max_redis_queued_bytes: int = 0
    # How often the writer gave up on a reader ("Failed to keep up"), how
    # many connections were cut, and how many protocols were built.
    failed_to_keep_up: int = 0
    cuts: int = 0
    batch_cuts: int = 0
    protocols: int = 0
    # Why connections were closed by their own side (ERROR lines sent).
    closes: dict[str, int] = attrs.Factory(dict)

    def note_protocol(self, proto: BaseReplicationProtocol) -> None:
        self.max_pending_commands = max(self.max_pending_commands, proto.pending_commands)
        self.max_pending_bytes = max(self.max_pending_bytes, proto.pending_bytes)


# -- cutting connections

CutMode = Literal["bytes", "batch"]


@attrs.define
class CutPlan:
    """Where to cut: after `after_bytes` more bytes ("bytes", which lands in
    the middle of a line but for luck), or a few bytes into the line that
    follows the next ``batch`` row ("batch": in the middle of a batch)."""

    mode: CutMode
    after_bytes: int
    done: bool = False


_BATCH_MARK: Final = b" batch "


class ProtocolProbe:
    """Watches one replication protocol and can cut its connection."""

    def __init__(self, proto: BaseReplicationProtocol, monitor: BoundsMonitor) -> None:
        self.proto = proto
        self._monitor = monitor
        self.cut: CutPlan | None = None
        self.was_cut = False
        self._carry = b""
        self._send = proto.send_command
        self._receive = proto.dataReceived
        self._write_error = proto._fail
        monitor.protocols += 1
        override(proto, "send_command", self._send_command)
        override(proto, "dataReceived", self._data_received)
        override(proto, "_fail", self._fail)

    def _send_command(self, cmd: Any) -> None:
        self._send(cmd)
        self._monitor.note_protocol(self.proto)

    def _fail(self, reason: str) -> None:
        key = re.sub(r"[0-9]+", "N", reason.split(":")[0])[:48]
        self._monitor.closes[key] = self._monitor.closes.get(key, 0) + 1
        if reason == "Failed to keep up":
            self._monitor.note_protocol(self.proto)
            self._monitor.failed_to_keep_up += 1
        self._write_error(reason)

    def arm(self, plan: CutPlan) -> None:
        self.cut = plan
        self._carry = b""

    def _data_received(self, data: bytes) -> None:
        plan = self.cut
        if self.was_cut:
            return
        if plan is None or plan.done:
            self._receive(data)
            return
        if plan.mode == "batch":
            data_to_scan = self._carry + data
            start = len(self._carry)
            index = 0
            while True:
                newline = data_to_scan.find(b"\n", index)
                if newline < 0:
                    break
                line = data_to_scan[index:newline]
                index = newline + 1
                if line.startswith(b"RDATA ") and _BATCH_MARK in line[:200]:
                    # Cut a few bytes into the next line: the batch is
                    # incomplete, and so is that line.
                    plan.mode = "bytes"
                    plan.after_bytes = 1 + plan.after_bytes % 60
                    self._monitor.batch_cuts += 1
                    consumed = index - start
                    if consumed > 0:
                        self._receive(data[:consumed])
                        data = data[consumed:]
                    self._carry = b""
                    self._cut_after(plan, data)
                    return
            # The start of an unfinished line is all a batch mark needs.
            self._carry = data_to_scan[index:][:256]
            self._receive(data)
            return
        self._cut_after(plan, data)

    def _cut_after(self, plan: CutPlan, data: bytes) -> None:
        if len(data) < plan.after_bytes:
            plan.after_bytes -= len(data)
            if data:
                self._receive(data)
            return
        head = data[: plan.after_bytes]
        plan.done = True
        self.was_cut = True
        self._monitor.cuts += 1
        if head:
            self._receive(head)
        transport = self.proto.transport
        if transport is not None:
            _log.info("cutting {conn} mid-line", conn=self.proto.describe())
            transport.abortConnection()  # type: ignore[attr-defined]  # a TCP transport here


# -- in memory


@implementer(ITransport, IConsumer, IPushProducer)
class MemoryEnd:
    """One end of a `MemoryLink`: the transport its protocol writes to."""

    def __init__(self, link: MemoryLink, protocol: Any, host: IPv4Address, peer: IPv4Address) -> None:
        self._link = link
        self.protocol = protocol
        self._host = host
        self._peer = peer
        self.producer: IPushProducer | None = None
        self.producer_paused = False
        # False while this end does not read (its peer's bytes pile up).
        self.reading = True
        self.disconnecting = False

    # ITransport
    def write(self, data: bytes) -> None:
        self._link.send(self, data)

    def writeSequence(self, data: Any) -> None:
        self._link.send(self, b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._link.lose(self)

    def abortConnection(self) -> None:
        self._link.close(self, Failure(ConnectionAborted()))

    def getPeer(self) -> IPv4Address:
        return self._peer

    def getHost(self) -> IPv4Address:
        return self._host

    # IConsumer
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    # IPushProducer: whether this end reads.
    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def stopProducing(self) -> None:
        self._link.close(self, Failure(ConnectionLost()))


class MemoryLink:
    """A server and a client protocol connected in memory.

    Bytes written by one end wait in its buffer until `pump` delivers them to
    the other, in random chunk sizes, unless the other end stopped reading.
    Past `HIGH_WATER` buffered bytes the writing end's producer is paused, and
    resumed below `LOW_WATER`, as a socket transport does. `loseConnection`
    closes once the buffer is delivered; `abortConnection` at once.
    """

    HIGH_WATER: Final = 8 * 1024
    LOW_WATER: Final = 2 * 1024
    _ports = 40000

    def __init__(self, server: Any, client: Any, rand: random.Random) -> None:
        MemoryLink._ports += 1
        server_address = IPv4Address("TCP", "127.0.0.1", 9000)
        client_address = IPv4Address("TCP", "127.0.0.1", MemoryLink._ports)
        self.server = MemoryEnd(self, server, server_address, client_address)
        self.client = MemoryEnd(self, client, client_address, server_address)
        self._buffers: dict[MemoryEnd, bytearray] = {self.server: bytearray(), self.client: bytearray()}
        self._rand = rand
        self.closed = False
        self._closing: set[MemoryEnd] = set()

    def start(self) -> None:
        self.server.protocol.makeConnection(self.server)
        if not self.closed:
            self.client.protocol.makeConnection(self.client)

    def _peer(self, end: MemoryEnd) -> MemoryEnd:
        return self.client if end is self.server else self.server

    def buffered(self) -> int:
        return sum(len(b) for b in self._buffers.values())

    def send(self, end: MemoryEnd, data: bytes) -> None:
        if self.closed or end in self._closing or not data:
            return
        buffer = self._buffers[end]
        buffer += data
        if len(buffer) > self.HIGH_WATER and end.producer is not None and not end.producer_paused:
            end.producer_paused = True
            end.producer.pauseProducing()

    def lose(self, end: MemoryEnd) -> None:
        self._closing.add(end)
        if not self._buffers[end]:
            self.close(end, Failure(ConnectionDone()))

    def close(self, end: MemoryEnd, reason: Failure) -> None:
        if self.closed:
            return
        self.closed = True
        for side in (self.server, self.client):
            self._buffers[side].clear()
            side_reason = reason if side is end else Failure(ConnectionLost())
            if side.producer is not None:
                side.producer.stopProducing()
            side.protocol.connectionLost(side_reason)

    def pump(self) -> bool:
        """Deliver what can be delivered; True if any byte moved."""
        moved = False
        for end in (self.server, self.client):
            peer = self._peer(end)
            buffer = self._buffers[end]
            while buffer and peer.reading and not self.closed:
                size = min(len(buffer), self._rand.choice((7, 61, 512, 4096, 65536)))
                chunk = bytes(buffer[:size])
                del buffer[:size]
                moved = True
                peer.protocol.dataReceived(chunk)
            if self.closed:
                return True
            if end.producer_paused and len(buffer) < self.LOW_WATER and end.producer is not None:
                end.producer_paused = False
                end.producer.resumeProducing()
            if end in self._closing and not buffer:
                self.close(end, Failure(ConnectionDone()))
                return True
        return moved


# -- time


class JumpingClock(Clock):
    """A `Clock` that follows the reactor's time (checked every few ms) and
    can be thrown forward with `jump`. A delayed call that raises is logged,
    as the reactor would, instead of stopping the clock."""

    def __init__(self, reactor: IReactorTime) -> None:
        super().__init__()
        self._reactor = reactor
        self._last = reactor.seconds()
        self.rightNow = 1_000_000.0
        self._loop = LoopingCall(self._follow)
        self._loop.clock = reactor
        self._loop.start(0.005, now=False)

    def _follow(self) -> None:
        now = self._reactor.seconds()
        self.advance(max(0.0, now - self._last))
        self._last = now

    def jump(self, seconds: float) -> None:
        _log.info("clock jumps {seconds} s forward", seconds=seconds)
        self.advance(seconds)

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        self._sortCalls()
        while self.calls and self.calls[0].getTime() <= self.seconds():
            call = self.calls.pop(0)
            call.called = 1
            try:
                call.func(*call.args, **call.kw)
            except Exception:
                _log.failure("a delayed call of the jumping clock failed")
            self._sortCalls()

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
