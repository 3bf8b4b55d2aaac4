# -*- test-case-name: tests.test_redis -*-
"""Replication over Redis pub/sub, as Synapse does it.

Every instance keeps two connections to Redis:

- the *subscriber* SUBSCRIBEs to the channel ``<server_name>`` (and, if this
  instance handles them, ``<server_name>/USER_IP``) and hands every message to
  the command handler;
- the *publisher* PUBLISHes every command we send: ``USER_IP`` on
  ``<server_name>/USER_IP``, everything else on ``<server_name>``. A message
  is the command's line without its newline. A new publisher connection is
  used once a PING round trip showed that Redis (and TLS) accept it.

Each subscriber session (from a confirmed SUBSCRIBE to the loss of that
connection) is one `RedisReplicationConnection` to the handler. On each, in
this order: the handler learns of it (`new_connection`), we publish
``REPLICATE`` so that writers announce their positions, and we announce our
own positions (other instances cannot know we reconnected). The order is the
point: a REPLICATE sent before the SUBSCRIBE is confirmed could be answered
before we listen, and the answers would be lost.

Redis has no sides, so there is no direction check; every instance also hears
its own commands, which the handler recognises and ignores. ``SERVER``,
``NAME``, ``PING`` and ``ERROR`` mean nothing here and are ignored. A message
that does not parse is logged and dropped; it harms nothing else.

The invariant for readers: no row is lost silently. While the publisher is
down, commands wait in a bounded queue and go out in order when it is back.
If any may have been lost (the queue overflowed and dropped its oldest, or the
connection went with PUBLISHes unanswered), the queued RDATA and POSITION are
discarded and fresh POSITIONs announced instead: a reader that missed rows
then fetches them through its catch-up before it accepts newer ones.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from synapse_replication import metrics
from synapse_replication.commands import (
    Command,
    PositionCommand,
    RdataCommand,
    ReplicateCommand,
    UserIpCommand,
    encode_command,
    parse_command_from_bytes,
)
from synapse_replication.errors import CommandEncodeError, CommandParseError, shorten
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.interfaces import (
    CommandCallback,
    IReplicationCommandHandler,
    IReplicationConnection,
    deliver,
    dispatch_table,
)
from synapse_replication.redis.client import (
    ReconnectingRedisClient,
    RedisClientProtocol,
    UnexpectedReplyError,
)
from synapse_replication.redis.settings import RedisSettings, redis_endpoint

__all__ = ["RedisReplicationClient", "RedisReplicationConnection", "user_ip_channel"]

_log: Final = Logger(namespace="synapse_replication.redis")

# Commands whose loss a POSITION repairs; when some may have been lost, queued
# ones are stale and are replaced by fresh POSITIONs.
_STREAM_COMMANDS: Final = frozenset({RdataCommand.NAME, PositionCommand.NAME})

SendPositions = Callable[[IReplicationConnection], object]


def user_ip_channel(server_name: str) -> str:
    """The channel USER_IP commands go to (only some instances handle them)."""
    return f"{server_name}/{UserIpCommand.NAME}"


@implementer(IReplicationConnection)
class RedisReplicationConnection:
    """One subscriber session, as the handler sees it.

    Sending publishes, through the shared publisher and its queue. Once the
    session is over (`lost`), sending does nothing: a stale connection must
    not speak for the next one, which gets a fresh object and its own
    catch-up. Closing drops the subscriber connection, which reconnects.
    """

    def __init__(
        self,
        *,
        description: str,
        publish: Callable[[Command], None],
        drop: Callable[[RedisReplicationConnection], None],
    ) -> None:
        self._description = description
        self._publish = publish
        self._drop = drop
        self.lost = False

    def send_command(self, cmd: Command) -> None:
        if self.lost:
            _log.debug(
                "{conn}: not sending {cmd}: session over", conn=self._description, cmd=cmd.NAME
            )
            return
        self._publish(cmd)

    def close(self) -> None:
        if not self.lost:
            self._drop(self)

    def describe(self) -> str:
        return self._description

    def peer_name(self) -> str | None:
        # Pub/sub has no single peer.
        return None


@attrs.frozen
class _Queued:
    """A command waiting for the publisher."""

    name: str
    channel: bytes
    payload: bytes


class RedisReplicationClient:
    """Connects an instance's command handler to Redis pub/sub.

    `reactor` must provide `IReactorTime` and `IReactorTCP` (or
    `IReactorUNIX` for `settings.path`), as Twisted's reactors do.
    `subscribe_user_ip`: also receive USER_IP (the instance that records
    client IPs). `send_positions(connection)` announces the positions of the
    streams we write on a connection; it defaults to the handler's own when
    the handler is a `ReplicationCommandHandler`. `rand` drives the backoff
    jitter.
    """

    def __init__(
        self,
        *,
        reactor: Any,
        handler: IReplicationCommandHandler,
        server_name: str,
        instance_name: str,
        settings: RedisSettings,
        subscribe_user_ip: bool = False,
        send_positions: SendPositions | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._handler = handler
        self._server_name = server_name
        self._instance_name = instance_name
        self._settings = settings
        if send_positions is None and isinstance(handler, ReplicationCommandHandler):
            send_positions = handler.send_positions
        self._send_positions = send_positions
        self._dispatch: dict[str, CommandCallback] = dispatch_table(handler)

        self.channel = server_name
        self.user_ip_channel = user_ip_channel(server_name)
        channels = [self.channel]
        if subscribe_user_ip:
            channels.append(self.user_ip_channel)
        self._channels = [c.encode("utf-8") for c in channels]
        self._description = f"redis {settings.address()} channel {server_name}"

        # The live subscriber session and the connection it runs on.
        self._connection: RedisReplicationConnection | None = None
        self._session_protocol: RedisClientProtocol | None = None

        self._queue: deque[_Queued] = deque()
        self._queued_bytes = 0
        # Commands dropped from the queue since the publisher was last up.
        self._dropped = 0
        # Some published commands may have been lost: announce positions
        # before anything else once the publisher is back.
        self._resync = False
        self._publisher_was_up = False

        endpoint = redis_endpoint(reactor, settings)
        where = f"{settings.address()} ({instance_name})"
        self._subscriber = ReconnectingRedisClient(
            clock=reactor,
            endpoint=endpoint,
            settings=settings,
            name=f"Redis subscriber {where}",
            prepare=self._subscribe,
            on_ready=self._on_subscribed,
            on_lost=self._on_subscriber_lost,
            on_message=self._on_message,
            rand=rand,
        )
        self._publisher = ReconnectingRedisClient(
            clock=reactor,
            endpoint=endpoint,
            settings=settings,
            name=f"Redis publisher {where}",
            prepare=self._check_publisher,
            on_ready=self._on_publisher_ready,
            on_lost=self._on_publisher_lost,
            rand=rand,
        )

    # -- public

    @property
    def connection(self) -> RedisReplicationConnection | None:
        """The current subscriber session, if subscribed."""
        return self._connection

    @property
    def publisher_connected(self) -> bool:
        return self._publisher.ready_protocol is not None

    @property
    def queued_commands(self) -> int:
        """Commands waiting for the publisher."""
        return len(self._queue)

    @property
    def pending_commands(self) -> int:
        """`queued_commands`, under the name metrics read."""
        return len(self._queue)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the commands waiting for the publisher."""
        return self._queued_bytes

    def start(self) -> None:
        """Connect both, and keep them connected until `stop`."""
        _log.info(
            "Replicating through {conn} as {instance}",
            conn=self._description,
            instance=self._instance_name,
        )
        metrics.track_send_queue(self, transport=metrics.REDIS)
        self._subscriber.start()
        self._publisher.start()

    async def stop(self) -> None:
        """Stop reconnecting, close both connections and wait until they are
        closed. Commands still queued are not sent."""
        await gatherResults(
            [
                Deferred.fromCoroutine(self._subscriber.stop()),
                Deferred.fromCoroutine(self._publisher.stop()),
            ]
        )
        metrics.untrack_send_queue(self)
        if self._queue:
            _log.warn(
                "{conn}: stopped with {count} commands not published",
                conn=self._description,
                count=len(self._queue),
            )
            self._queue.clear()
            self._queued_bytes = 0

    async def flush(self) -> bool:
        """Wait until Redis has answered every PUBLISH sent so far (one PING
        round trip: Redis answers in order), so that a clean shutdown knows
        its last commands went out before `stop` closes the connection.
        False, at once, if the publisher is down or commands wait for it;
        False if the PING fails or times out (`reply_timeout`)."""
        proto = self._publisher.ready_protocol
        if proto is None or self._queue:
            return False
        try:
            await proto.execute(b"PING")
        except Exception as e:
            _log.info("{conn}: flush failed: {error}", conn=self._description, error=e)
            return False
        return True

    def publish_command(self, cmd: Command) -> None:
        """Publish `cmd` on its channel, or queue it while the publisher is
        down. A command that cannot be encoded is our bug: logged, dropped."""
        try:
            payload = encode_command(cmd)
        except CommandEncodeError:
            _log.failure("{conn}: cannot encode {cmd}; dropped", conn=self._description, cmd=cmd.NAME)
            return
        metrics.REDIS_OUTBOUND[cmd.NAME] += 1
        channel = self.user_ip_channel if cmd.NAME == UserIpCommand.NAME else self.channel
        item = _Queued(cmd.NAME, channel.encode("utf-8"), payload)
        proto = self._publisher.ready_protocol
        if proto is not None and not self._queue:
            proto.send(b"PUBLISH", item.channel, item.payload)
            return
        self._enqueue(item)

    # -- subscriber

    async def _subscribe(self, proto: RedisClientProtocol) -> None:
        await proto.subscribe(self._channels)

    def _on_subscribed(self, proto: RedisClientProtocol) -> None:
        """SUBSCRIBE is confirmed: only now may REPLICATE go out."""
        conn = RedisReplicationConnection(
            description=self._description, publish=self.publish_command, drop=self._drop
        )
        self._connection = conn
        self._session_protocol = proto
        metrics.track_connection(conn, transport=metrics.REDIS, side="subscriber")
        self._handler.new_connection(conn)
        conn.send_command(ReplicateCommand())
        if self._send_positions is not None:
            self._send_positions(conn)

    def _on_subscriber_lost(self, proto: RedisClientProtocol) -> None:
        conn = self._connection
        self._connection = None
        self._session_protocol = None
        if conn is not None:
            conn.lost = True
            metrics.untrack_connection(conn)
            self._handler.lost_connection(conn)

    def _drop(self, conn: RedisReplicationConnection) -> None:
        if conn is self._connection and self._session_protocol is not None:
            _log.warn("{conn}: dropping the subscriber connection", conn=self._description)
            self._session_protocol.abort()

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        conn = self._connection
        channel_name = channel.decode("utf-8", "replace")
        if conn is None or channel not in self._channels:
            _log.debug(
                "{conn}: ignoring a message on {channel!r}", conn=self._description, channel=channel_name
            )
            return
        if len(payload) > self._settings.max_line_length:
            self._drop_long_message(conn, channel_name, payload)
            return
        if not payload.strip():
            return
        try:
            # The bytes parser, as the TCP protocol uses: the same commands
            # and errors as decoding first, faster for RDATA and POSITION.
            cmd = parse_command_from_bytes(payload)
        except CommandParseError as e:
            if isinstance(e.__cause__, UnicodeDecodeError):
                # USER_IP lines hold access tokens: show none of them.
                shown = (
                    f"{len(payload)} bytes"
                    if channel_name == self.user_ip_channel
                    else shorten(repr(payload))
                )
                _log.warn(
                    "{conn}: dropping a message on channel {channel!r} that is not UTF-8 "
                    "(byte {at}): {shown}",
                    conn=self._description,
                    channel=channel_name,
                    at=e.__cause__.start,
                    shown=shown,
                )
            else:
                _log.warn(
                    "{conn}: dropping a message on channel {channel!r}: {error}",
                    conn=self._description,
                    channel=channel_name,
                    error=e,
                )
            return
        metrics.REDIS_INBOUND[cmd.NAME] += 1
        callback = self._dispatch.get(cmd.NAME)
        if callback is None:
            # SERVER, NAME, PING, ERROR: TCP handshake and keepalive only.
            _log.debug(
                "{conn}: ignoring {cmd} on channel {channel!r}",
                conn=self._description,
                cmd=cmd.NAME,
                channel=channel_name,
            )
            return
        deliver(callback, conn, cmd)

    def _drop_long_message(
        self, conn: RedisReplicationConnection, channel_name: str, payload: bytes
    ) -> None:
        """A message over the line limit is not parsed. If it is an RDATA,
        the row it holds may be one this reader needs: the session starts
        again, and its POSITIONs make the reader fetch the row by catch-up
        (where no line limit applies), as a TCP reader does after refusing
        a long line."""
        is_rdata = payload.startswith(RdataCommand.NAME.encode("ascii") + b" ")
        _log.warn(
            "{conn}: dropping a message of {size} bytes on channel {channel!r}, over "
            "the {limit} byte line limit{then}",
            conn=self._description,
            size=len(payload),
            channel=channel_name,
            limit=self._settings.max_line_length,
            then="; resubscribing to catch up" if is_rdata else "",
        )
        if is_rdata:
            conn.close()

    # -- publisher

    async def _check_publisher(self, proto: RedisClientProtocol) -> None:
        """One round trip before the queue is flushed into a new connection:
        a connection that Redis (or its TLS layer) is about to refuse would
        otherwise swallow the queue."""
        reply = await proto.execute(b"PING")
        if reply != "PONG":
            raise UnexpectedReplyError(f"PING answered with {reply!r}")

    def _enqueue(self, item: _Queued) -> None:
        settings = self._settings
        size = len(item.payload)
        if size > settings.max_queued_bytes:
            self._note_drop(item.name)
            return
        while self._queue and (
            len(self._queue) >= settings.max_queued_commands
            or self._queued_bytes + size > settings.max_queued_bytes
        ):
            oldest = self._queue.popleft()
            self._queued_bytes -= len(oldest.payload)
            self._note_drop(oldest.name)
        self._queue.append(item)
        self._queued_bytes += size

    def _note_drop(self, name: str) -> None:
        if self._dropped == 0:
            _log.error(
                "{conn}: Redis publisher down and {limit} commands queued; dropping "
                "the oldest ({cmd}), readers will catch up through POSITION",
                conn=self._description,
                limit=len(self._queue),
                cmd=name,
            )
        self._dropped += 1
        self._resync = True

    def _on_publisher_lost(self, proto: RedisClientProtocol) -> None:
        metrics.untrack_connection(proto)
        if "PUBLISH" in proto.unanswered_at_loss:
            _log.warn(
                "{conn}: publisher lost with PUBLISHes unanswered; will announce "
                "positions when it is back",
                conn=self._description,
            )
            self._resync = True

    def _on_publisher_ready(self, proto: RedisClientProtocol) -> None:
        """Resynchronise if needed, send what waited, announce positions."""
        metrics.track_connection(proto, transport=metrics.REDIS, side="publisher")
        reconnect = self._publisher_was_up
        self._publisher_was_up = True
        resync, self._resync = self._resync, False
        if self._dropped:
            _log.error(
                "{conn}: {count} commands were dropped while the Redis publisher was down",
                conn=self._description,
                count=self._dropped,
            )
            self._dropped = 0
        queue, self._queue = self._queue, deque()
        self._queued_bytes = 0
        if resync:
            queue = deque(item for item in queue if item.name not in _STREAM_COMMANDS)
        conn = self._connection
        # After a possible loss the fresh POSITIONs go first; otherwise the
        # queue goes out in order, and positions after it on a reconnect.
        if resync and conn is not None and self._send_positions is not None:
            self._send_positions(conn)
        for item in queue:
            proto.send(b"PUBLISH", item.channel, item.payload)
        if reconnect and not resync and conn is not None and self._send_positions is not None:
            self._send_positions(conn)
