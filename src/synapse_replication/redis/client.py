# -*- test-case-name: tests.test_redis -*-
"""A minimal Redis client on Twisted: one protocol per connection, and a
keeper that reconnects it.

`RedisClientProtocol` sends requests (AUTH, SELECT, SUBSCRIBE, PUBLISH, PING)
and matches replies to them in order, as RESP guarantees; pub/sub messages,
which are not replies, go to a callback. It knows nothing of replication.
Its one policy is liveness: every request must be answered within
`reply_timeout`, and a PING is sent every `ping_interval` once the connection
is ready, so a hung server or a half-open connection is found and aborted
instead of waiting forever.

`ReconnectingRedisClient` keeps one such connection up: connect, AUTH, SELECT,
the caller's own preparation (SUBSCRIBE), then hand it over; on any failure,
log why and try again after a growing, jittered delay, until stopped. Both
take their clock explicitly, so tests may drive them with
`twisted.internet.task.Clock`.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from synapse_replication.errors import ReplicationError
from synapse_replication.redis.resp import (
    RespError,
    RespParser,
    RespProtocolError,
    RespPush,
    RespValue,
    encode_request,
)
from synapse_replication.redis.settings import RedisSettings
from synapse_replication.tcp import _Abortable

__all__ = [
    "MessageCallback",
    "ReconnectingRedisClient",
    "RedisClientProtocol",
    "RedisReplyError",
    "UnexpectedReplyError",
]

_log: Final = Logger(namespace="synapse_replication.redis")

# (channel, payload) of a pub/sub message.
MessageCallback = Callable[[bytes, bytes], None]


class RedisReplyError(ReplicationError):
    """Redis answered a request with an error (``WRONGPASS``, ``NOAUTH``...).

    `command` is the command's name only: its arguments may hold a password.
    """

    def __init__(self, command: str, error: RespError) -> None:
        self.command = command
        self.error = error
        super().__init__(f"Redis refused {command}: {error.message}")


class UnexpectedReplyError(ReplicationError):
    """Redis answered with something that is not what the request gets."""


@attrs.define
class _Pending:
    """A request sent and not yet fully answered."""

    command: str
    # Replies it gets: 1, or one per channel for SUBSCRIBE.
    expected: int
    sent_at: float
    # None: nobody waits for the reply; an error reply is logged.
    deferred: Deferred[list[RespValue]] | None
    replies: list[RespValue] = attrs.Factory(list)


class RedisClientProtocol(Protocol):
    """One connection to Redis.

    Invariants: `_pending` holds the requests sent and not answered, oldest
    first, and each reply answers the oldest (RESP is strictly ordered); a
    watchdog is armed whenever a request is pending, and fires at the latest
    `reply_timeout` after the oldest was sent; once the connection is closing
    nothing more is read or sent, and on loss every waiter is told.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        name: str,
        reply_timeout: float,
        close_timeout: float,
        on_message: MessageCallback | None = None,
    ) -> None:
        """`name` says which connection this is, in logs."""
        self._clock = clock
        self.name = name
        self._reply_timeout = reply_timeout
        self._close_timeout = close_timeout
        self._on_message = on_message
        self._parser = RespParser()
        self._pending: deque[_Pending] = deque()
        # Set when SUBSCRIBE is sent: from then on an array starting with
        # "message" is a pub/sub message, not a reply.
        self._subscribing = False
        self._connected = False
        self._closing = False
        self._lost = False
        self.lost_reason: Failure | None = None
        # Commands still unanswered when the connection went: a PUBLISH among
        # them may or may not have reached Redis.
        self.unanswered_at_loss: list[str] = []
        self._lost_waiters: list[Deferred[None]] = []
        self._watchdog: IDelayedCall | None = None
        self._ping_call: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None

    # -- state

    @property
    def usable(self) -> bool:
        """Connected, and neither closing nor lost."""
        return self._connected and not self._closing and not self._lost

    def when_lost(self) -> Deferred[None]:
        """Fires (with None) once the connection is gone."""
        d: Deferred[None] = Deferred()
        if self._lost:
            d.callback(None)
        else:
            self._lost_waiters.append(d)
        return d

    # -- requests

    async def execute(self, *args: bytes | str | int) -> RespValue:
        """Send one command and return its reply. Raises `RedisReplyError` for
        an error reply and the connection's failure if it goes first."""
        (reply,) = await self._request(args, 1)
        return reply

    async def subscribe(self, channels: Sequence[bytes]) -> None:
        """``SUBSCRIBE`` to `channels`; returns once Redis confirmed every one,
        i.e. once messages published on them from now on will reach us."""
        self._subscribing = True
        replies = await self._request((b"SUBSCRIBE", *channels), len(channels))
        for channel, reply in zip(channels, replies, strict=True):
            if not (
                isinstance(reply, list)
                and len(reply) == 3
                and reply[0] == b"subscribe"
                and reply[1] == channel
            ):
                raise UnexpectedReplyError(
                    f"SUBSCRIBE {channel!r} answered with {reply!r}"
                )

    def send(self, *args: bytes | str | int) -> None:
        """Send one command whose reply nobody waits for (PUBLISH, PING); an
        error reply is logged. Dropped if the connection is not usable."""
        if not self.usable:
            return
        self._write(args, 1, None)

    def _request(
        self, args: tuple[bytes | str | int, ...], expected: int
    ) -> Deferred[list[RespValue]]:
        if not self.usable:
            return fail(ConnectionDone(f"{self.name} is not connected"))
        d: Deferred[list[RespValue]] = Deferred()
        self._write(args, expected, d)
        return d

    def _write(
        self,
        args: tuple[bytes | str | int, ...],
        expected: int,
        deferred: Deferred[list[RespValue]] | None,
    ) -> None:
        command = args[0]
        name = command.decode("ascii") if isinstance(command, bytes) else str(command)
        assert self.transport is not None
        self.transport.write(encode_request(*args))
        self._pending.append(_Pending(name, expected, self._clock.seconds(), deferred))
        self._arm_watchdog()

    # -- keepalive

    def start_pinging(self, interval: float) -> None:
        """PING every `interval` seconds from now on, so that a dead server
        is found even when we have nothing else to say. PING is allowed in
        subscribe mode (its reply is then ``["pong", ""]``)."""
        if self._ping_call is None and self.usable:
            self._ping_call = self._clock.callLater(interval, self._ping, interval)

    def _ping(self, interval: float) -> None:
        self._ping_call = None
        if not self.usable:
            return
        self.send(b"PING")
        self._ping_call = self._clock.callLater(interval, self._ping, interval)

    def _arm_watchdog(self) -> None:
        if self._watchdog is None and self._pending and not self._lost:
            due = self._pending[0].sent_at + self._reply_timeout
            self._watchdog = self._clock.callLater(
                max(due - self._clock.seconds(), 0), self._check_replies
            )

    def _check_replies(self) -> None:
        """The oldest pending request must have been answered by now; the
        watchdog is re-armed for the next one rather than moved on each
        reply, which would cost a timer per reply."""
        self._watchdog = None
        if self._lost or not self._pending:
            return
        oldest = self._pending[0]
        if self._clock.seconds() - oldest.sent_at >= self._reply_timeout:
            _log.warn(
                "{name}: no reply to {command} within {timeout} s; dropping the connection",
                name=self.name,
                command=oldest.command,
                timeout=self._reply_timeout,
            )
            self.abort()
            return
        self._arm_watchdog()

    # -- closing

    def close(self) -> None:
        """Close cleanly; abort if the close takes over `close_timeout`."""
        if self._lost or self._closing:
            return
        self._closing = True
        if self.transport is None:
            return
        self.transport.loseConnection()
        self._abort_call = self._clock.callLater(self._close_timeout, self._abort_transport)

    def abort(self) -> None:
        """Drop the connection now, without waiting for anything."""
        if self._lost:
            return
        self._closing = True
        self._abort_transport()

    def _abort_transport(self) -> None:
        self._abort_call = None
        transport = self.transport
        if self._lost or transport is None:
            return
        if isinstance(transport, _Abortable):
            transport.abortConnection()
        else:
            transport.loseConnection()

    # -- Protocol

    def connectionMade(self) -> None:
        self._connected = True

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._lost:
            return
        try:
            values = self._parser.feed(data)
        except RespProtocolError as e:
            _log.error("{name}: {error}; dropping the connection", name=self.name, error=e)
            self.abort()
            return
        for value in values:
            if self._closing:
                return
            self._on_value(value)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._connected = False
        self.lost_reason = reason
        for call in (self._watchdog, self._ping_call, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._watchdog = self._ping_call = self._abort_call = None
        pending = list(self._pending)
        self._pending.clear()
        self.unanswered_at_loss = [p.command for p in pending]
        for p in pending:
            if p.deferred is not None:
                p.deferred.errback(reason)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    # -- replies and messages

    def _on_value(self, value: RespValue) -> None:
        if isinstance(value, RespPush):
            self._on_push(list(value.items))
            return
        if (
            self._subscribing
            and isinstance(value, list)
            and value
            and value[0] in (b"message", b"pmessage")
        ):
            self._on_push(value)
            return
        if not self._pending:
            _log.error(
                "{name}: Redis sent a reply to nothing we asked: {reply!r}; "
                "dropping the connection",
                name=self.name,
                reply=value,
            )
            self.abort()
            return
        pending = self._pending[0]
        if isinstance(value, RespError):
            # One error answers the whole request, even a SUBSCRIBE of many.
            self._pending.popleft()
            if pending.deferred is not None:
                pending.deferred.errback(RedisReplyError(pending.command, value))
            else:
                _log.error(
                    "{name}: Redis refused {command}: {error}",
                    name=self.name,
                    command=pending.command,
                    error=value.message,
                )
            return
        pending.replies.append(value)
        if len(pending.replies) < pending.expected:
            return
        self._pending.popleft()
        if pending.deferred is not None:
            pending.deferred.callback(pending.replies)

    def _on_push(self, items: list[RespValue]) -> None:
        if (
            len(items) == 3
            and items[0] == b"message"
            and isinstance(items[1], bytes)
            and isinstance(items[2], bytes)
        ):
            if self._on_message is None:
                return
            try:
                self._on_message(items[1], items[2])
            except Exception:
                _log.failure("{name}: failed to handle a pub/sub message", name=self.name)
            return
        _log.debug("{name}: ignoring push {items!r}", name=self.name, items=items)


class _ProtocolFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], RedisClientProtocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: IAddress | None) -> RedisClientProtocol:
        return self._build()


class ReconnectingRedisClient:
    """Keeps one connection to Redis up until `stop`.

    Each attempt: connect; ``AUTH`` if there is a password; ``SELECT`` if
    there is a database number; then `prepare` (e.g. SUBSCRIBE). Only when
    all succeeded is the connection handed to `on_ready`, and its loss then
    reported to `on_lost`, exactly once per `on_ready`. Any failure (refused
    connection, error reply, reply timeout, lost connection) is logged and
    followed by another attempt after a delay from `settings.backoff`, reset
    once a connection is ready. A failed AUTH is logged at error level every
    time: it is a configuration mistake that retrying will not fix by itself.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        endpoint: IStreamClientEndpoint,
        settings: RedisSettings,
        name: str,
        on_ready: Callable[[RedisClientProtocol], None],
        on_lost: Callable[[RedisClientProtocol], None],
        prepare: Callable[[RedisClientProtocol], Awaitable[None]] | None = None,
        on_message: MessageCallback | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """`name` says which connection this is in logs (it should say where
        to, e.g. ``Redis subscriber 127.0.0.1:6379``). `rand` returns a
        float in [0, 1) and drives the backoff's jitter."""
        self._clock = clock
        self._endpoint = endpoint
        self._settings = settings
        self.name = name
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._prepare = prepare
        self._on_message = on_message
        self._rand = rand
        self._next_delay = settings.backoff.initial
        self._stopping = False
        self._running: Deferred[None] | None = None
        self._done_waiters: list[Deferred[None]] = []
        # What a stop must interrupt: a connect attempt or a backoff delay.
        self._waiting: Deferred[Any] | None = None
        # The connection being prepared or in use.
        self._protocol: RedisClientProtocol | None = None
        self._ready = False

    @property
    def ready_protocol(self) -> RedisClientProtocol | None:
        """The connection handed to `on_ready` and not yet lost."""
        proto = self._protocol
        if self._ready and proto is not None and proto.usable:
            return proto
        return None

    def start(self) -> None:
        """Start connecting; keep doing so until `stop`."""
        if self._running is not None:
            raise RuntimeError(f"{self.name} already started")
        running = Deferred.fromCoroutine(self._run())
        running.addErrback(lambda f: _log.failure("{name}: loop failed", f, name=self.name))
        self._running = running
        running.addBoth(self._finished)

    async def stop(self) -> None:
        """Make no more attempts, close the connection and wait until it is
        closed."""
        self._stopping = True
        if self._waiting is not None:
            self._waiting.cancel()
        if self._protocol is not None:
            self._protocol.close()
        if self._running is None:
            return
        d: Deferred[None] = Deferred()
        self._done_waiters.append(d)
        await d

    def _finished(self, _: object) -> None:
        self._running = None
        waiters, self._done_waiters = self._done_waiters, []
        for d in waiters:
            d.callback(None)

    async def _run(self) -> None:
        while not self._stopping:
            await self._attempt()
            if self._stopping:
                break
            backoff = self._settings.backoff
            delay = self._next_delay * (1 - backoff.jitter * self._rand())
            self._next_delay = min(self._next_delay * backoff.factor, backoff.maximum)
            _log.info("{name}: reconnecting in {delay:.2f} s", name=self.name, delay=delay)
            sleeping: Deferred[None] = deferLater(self._clock, delay, lambda: None)
            self._waiting = sleeping
            try:
                await sleeping
            except CancelledError:
                break
            finally:
                self._waiting = None

    async def _attempt(self) -> None:
        """One connection, from connect to loss (or failure on the way)."""
        connecting: Deferred[Any] = self._endpoint.connect(
            _ProtocolFactory(self._build_protocol)
        )
        self._waiting = connecting
        try:
            proto = await connecting
        except Exception as e:
            if not self._stopping:
                _log.warn("{name}: cannot connect: {error}", name=self.name, error=_describe(e))
            return
        finally:
            self._waiting = None
        assert isinstance(proto, RedisClientProtocol)
        self._protocol = proto
        try:
            if not await self._handshake(proto):
                return
            self._next_delay = self._settings.backoff.initial
            self._ready = True
            proto.start_pinging(self._settings.ping_interval)
            _log.info("{name}: connected", name=self.name)
            try:
                self._on_ready(proto)
            except Exception:
                _log.failure("{name}: failed to set up a new connection", name=self.name)
                proto.abort()
            await proto.when_lost()
            if not self._stopping:
                reason = proto.lost_reason
                _log.warn(
                    "{name}: connection lost: {reason}",
                    name=self.name,
                    reason=reason.getErrorMessage() if reason is not None else "unknown",
                )
        finally:
            if self._ready:
                self._ready = False
                try:
                    self._on_lost(proto)
                except Exception:
                    _log.failure("{name}: failed to handle a lost connection", name=self.name)
            proto.abort()
            await proto.when_lost()
            self._protocol = None

    async def _handshake(self, proto: RedisClientProtocol) -> bool:
        """AUTH, SELECT and `prepare`; False (logged) if any of them failed."""
        settings = self._settings
        step = "AUTH"
        try:
            if settings.password is not None:
                if settings.username is not None:
                    await _expect_ok(proto, b"AUTH", settings.username, settings.password)
                else:
                    await _expect_ok(proto, b"AUTH", settings.password)
            step = "SELECT"
            if settings.dbid is not None:
                await _expect_ok(proto, b"SELECT", settings.dbid)
            step = "setup"
            if self._prepare is not None:
                await self._prepare(proto)
        except RedisReplyError as e:
            if not self._stopping:
                _log.error(
                    "{name}: Redis refused {command}: {error} (check the Redis "
                    "password, username and database number); will retry",
                    name=self.name,
                    command=e.command,
                    error=self._redact(e.error.message),
                )
            return False
        except Exception as e:
            if not self._stopping:
                _log.warn(
                    "{name}: connection failed during {step}: {error}",
                    name=self.name,
                    step=step,
                    error=_describe(e),
                )
            return False
        return True

    def _redact(self, text: str) -> str:
        """`text` without the password, should Redis ever echo it."""
        password = self._settings.password
        if password:
            return text.replace(password, "<redacted>")
        return text

    def _build_protocol(self) -> RedisClientProtocol:
        return RedisClientProtocol(
            clock=self._clock,
            name=self.name,
            reply_timeout=self._settings.reply_timeout,
            close_timeout=self._settings.close_timeout,
            on_message=self._on_message,
        )


async def _expect_ok(proto: RedisClientProtocol, *args: bytes | str | int) -> None:
    reply = await proto.execute(*args)
    if reply != "OK":
        raise UnexpectedReplyError(f"{args[0]!r} answered with {reply!r}")


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__
