# -*- test-case-name: tests.test_handler -*-
"""`ReplicationCommandHandler`: what commands mean, whatever carries them.

The reader's promise is that `on_rdata` sees every row of every writer exactly
once and in token order. How it keeps it:

- Commands of one stream are handled one at a time, in arrival order, through a
  per-stream queue; a stream whose data handler is slow does not hold up others.
- Rows are accepted from a (stream, writer) on a connection only after a
  POSITION from that writer was processed on that connection ("caught up").
  Processing a POSITION fetches, through the stream's update function, every row
  between the reader's own position and the announced one, so rows sent before
  that (or lost with a previous connection) are never skipped.
- RDATA at or below the reader's position is a duplicate and is discarded.
- RDATA dropped because the stream was not caught up is remembered by token: the
  catch-up then runs at least up to it, so a catch-up that failed and was
  retried cannot leave a hole below rows accepted later.
- Rows with token ``batch`` are held per (connection, stream, writer) until the
  row with the real token arrives, and delivered together.
- Our own commands echoed back (Redis) and commands for unknown streams or from
  instances that do not write that stream are logged and dropped without
  touching any other stream or the connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Final, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from synapse_replication import metrics
from synapse_replication.commands import (
    CancelTaskCommand,
    ClearUserSyncCommand,
    Command,
    FederationAckCommand,
    LockReleasedCommand,
    NewActiveTaskCommand,
    PositionCommand,
    RdataCommand,
    RemoteServerUpCommand,
    ReplicateCommand,
    UserIpCommand,
    UserSyncCommand,
)
from synapse_replication.data_handler import IReplicationDataHandler
from synapse_replication.errors import ReplicationError
from synapse_replication.interfaces import (
    HandlerResult,
    IReplicationCommandHandler,
    IReplicationConnection,
)
from synapse_replication.streams import Stream
from synapse_replication.streams.parsed import (
    ParsedUpdateFunction,
    ParsedUpdateResult,
    UpdateFunctionWithParsed,
    parse_updates,
)

_log: Final = Logger(namespace="synapse_replication.handler")

T = TypeVar("T")

# A reader restarting a stream that went backwards refetches from here.
RESET_FROM_TOKEN: Final = 0

# (stream name, writer instance name)
_Key = tuple[str, str]
_QueueItem = tuple[IReplicationConnection, RdataCommand | PositionCommand]

OtherCommandCallback = Callable[[IReplicationConnection, Command], HandlerResult]


@attrs.frozen
class HandlerLimits:
    """Bounds on what a peer can make the reader hold in memory."""

    # Commands waiting per stream while an earlier one of that stream is handled.
    max_queued_commands_per_stream: int = 10_000
    # Rows with token `batch` held per (connection, stream, writer).
    max_pending_batch_rows: int = 10_000
    # Rows asked for per call of an update function during catch-up.
    catch_up_row_count: int = 1_000
    # First delay, then doubled up to the maximum, before retrying a failed
    # catch-up.
    catch_up_retry_initial_s: float = 0.5
    catch_up_retry_max_s: float = 30.0


class CatchUpError(ReplicationError):
    """An update function broke its contract (e.g. limited without progress)."""


@attrs.define
class _ConnectionState:
    """What the handler knows per connection."""

    caught_up: set[_Key] = attrs.Factory(set)
    # Highest token of RDATA dropped while not caught up.
    dropped_upto: dict[_Key, int] = attrs.Factory(dict)
    pending_batches: dict[_Key, list[Any]] = attrs.Factory(dict)


@implementer(IReplicationCommandHandler)
class ReplicationCommandHandler:
    """Transport-agnostic replication logic for one instance.

    `streams` are all the streams this instance knows, by name (followed and
    written). `writer_streams` names those this instance writes: it answers
    REPLICATE with their positions. `stream_writers` maps a stream to the
    instances allowed to write it; a stream absent from it accepts any writer.
    """

    def __init__(
        self,
        *,
        instance_name: str,
        clock: IReactorTime,
        streams: Mapping[str, Stream[Any]],
        data_handler: IReplicationDataHandler,
        writer_streams: Collection[str] = (),
        stream_writers: Mapping[str, Collection[str]] | None = None,
        limits: HandlerLimits | None = None,
        on_other_command: OtherCommandCallback | None = None,
    ) -> None:
        self.instance_name = instance_name
        self._clock = clock
        self._streams = dict(streams)
        self._data_handler = data_handler
        self._writer_streams = [self._streams[name] for name in writer_streams]
        self._stream_writers = {
            name: frozenset(writers) for name, writers in (stream_writers or {}).items()
        }
        self._limits = limits or HandlerLimits()
        self._on_other_command = on_other_command

        self._connections: list[IReplicationConnection] = []
        self._state: dict[IReplicationConnection, _ConnectionState] = {}
        self._queues: dict[str, deque[_QueueItem]] = {}
        self._busy: set[str] = set()
        # Names already warned about, so a peer cannot flood the log.
        self._warned: set[tuple[str, str]] = set()
        # Next delay before retrying a failed catch-up, per (connection, key).
        self._retry_delays: dict[tuple[IReplicationConnection, _Key], float] = {}
        # Retries waiting to run, per connection: cancelled when it is lost.
        self._retry_calls: dict[IReplicationConnection, set[IDelayedCall]] = {}
        # Latest token each writer announced (for metrics: the reader's lag).
        self._announced: dict[_Key, int] = {}

    # Connections

    def connections(self) -> list[IReplicationConnection]:
        return list(self._connections)

    def connected(self) -> bool:
        return bool(self._connections)

    def announced_positions(self) -> dict[_Key, int]:
        """The latest token each (stream, writer) announced: the highest RDATA
        token, or a later POSITION's new token (which may be lower, after a
        writer restart). A copy, safe to take from another thread."""
        return self._announced.copy()

    def queued_commands(self) -> dict[str, int]:
        """RDATA/POSITION waiting behind a busy stream, per stream with any."""
        return {name: len(queue) for name, queue in self._queues.copy().items() if queue}

    def is_idle(self) -> bool:
        """No command is being handled or waiting (for tests and shutdown)."""
        return not self._busy and not any(self._queues.values())

    def new_connection(self, connection: IReplicationConnection) -> None:
        # The transport logs the event itself (with more detail); this line
        # is for following the handler's own bookkeeping.
        _log.debug("Replication connection up: {conn}", conn=connection.describe())
        self._connections.append(connection)
        self._state[connection] = _ConnectionState()

    def lost_connection(self, connection: IReplicationConnection) -> None:
        _log.debug("Replication connection lost: {conn}", conn=connection.describe())
        if connection in self._connections:
            self._connections.remove(connection)
        self._state.pop(connection, None)
        for retry_key in [k for k in self._retry_delays if k[0] is connection]:
            del self._retry_delays[retry_key]
        for call in self._retry_calls.pop(connection, ()):
            if call.active():
                call.cancel()

    def send_command(self, cmd: Command) -> None:
        """Send `cmd` on every connection."""
        for connection in self._connections:
            connection.send_command(cmd)

    def send_positions(self, connection: IReplicationConnection) -> None:
        """Announce the position of every stream we write on `connection`."""
        for stream in self._writer_streams:
            token = stream.current_token(self.instance_name)
            connection.send_command(
                PositionCommand(stream.NAME, self.instance_name, token, token)
            )

    # Commands

    def on_replicate(self, connection: IReplicationConnection, cmd: ReplicateCommand) -> None:
        self.send_positions(connection)

    def on_rdata(self, connection: IReplicationConnection, cmd: RdataCommand) -> None:
        if self._accept(connection, cmd.stream_name, cmd.instance_name, cmd):
            key = (cmd.stream_name, cmd.instance_name)
            if cmd.token is not None and cmd.token > self._announced.get(key, cmd.token - 1):
                self._announced[key] = cmd.token
            self._submit(cmd.stream_name, connection, cmd)

    def on_position(self, connection: IReplicationConnection, cmd: PositionCommand) -> None:
        if self._accept(connection, cmd.stream_name, cmd.instance_name, cmd):
            self._announced[(cmd.stream_name, cmd.instance_name)] = cmd.new_token
            self._submit(cmd.stream_name, connection, cmd)

    def _accept(
        self,
        connection: IReplicationConnection,
        stream_name: str,
        instance_name: str,
        cmd: Command,
    ) -> bool:
        if instance_name == self.instance_name:
            return False  # our own command, echoed back by Redis
        if stream_name not in self._streams:
            self._warn_once(
                ("stream", stream_name),
                "Dropping {cmd} for unknown stream {stream!r} from {conn}",
                cmd=cmd.NAME,
                stream=stream_name,
                conn=connection.describe(),
            )
            return False
        writers = self._stream_writers.get(stream_name)
        if writers is not None and instance_name not in writers:
            self._warn_once(
                ("writer", f"{stream_name}/{instance_name}"),
                "Dropping {cmd} for stream {stream!r} from {instance!r}, which does "
                "not write it (writers: {writers}) on {conn}",
                cmd=cmd.NAME,
                stream=stream_name,
                instance=instance_name,
                writers=sorted(writers),
                conn=connection.describe(),
            )
            return False
        return True

    def _warn_once(self, key: tuple[str, str], fmt: str, **kwargs: Any) -> None:
        if key in self._warned:
            _log.debug(fmt, **kwargs)
        else:
            self._warned.add(key)
            _log.warn(fmt, **kwargs)

    # The per-stream queue

    def _submit(
        self,
        stream_name: str,
        connection: IReplicationConnection,
        cmd: RdataCommand | PositionCommand,
    ) -> None:
        if stream_name in self._busy:
            queue = self._queues.setdefault(stream_name, deque())
            if len(queue) >= self._limits.max_queued_commands_per_stream:
                self._overflow(stream_name, connection)
                return
            queue.append((connection, cmd))
            return
        self._run(stream_name, connection, cmd)

    def _run(
        self,
        stream_name: str,
        connection: IReplicationConnection,
        cmd: RdataCommand | PositionCommand,
    ) -> None:
        """Handle commands of a stream until one has to wait, or none is left."""
        while True:
            pending = self._handle(connection, cmd)
            if pending is not None:
                d = _as_deferred(pending)
                if not d.called:
                    self._busy.add(stream_name)
                    d.addBoth(self._resume, stream_name, cmd)
                    return
                d.addErrback(self._log_failure, stream_name, cmd)
            queue = self._queues.get(stream_name)
            if not queue:
                return
            connection, cmd = queue.popleft()

    def _resume(self, result: object, stream_name: str, cmd: Command) -> None:
        if isinstance(result, Failure):
            self._log_failure(result, stream_name, cmd)
        self._busy.discard(stream_name)
        queue = self._queues.get(stream_name)
        if queue:
            connection, next_cmd = queue.popleft()
            self._run(stream_name, connection, next_cmd)

    def _log_failure(self, failure: Failure, stream_name: str, cmd: Command) -> None:
        _log.failure(
            "Failed to handle {cmd} for stream {stream!r}",
            failure,
            cmd=cmd.NAME,
            stream=stream_name,
        )

    def _overflow(self, stream_name: str, connection: IReplicationConnection) -> None:
        """Too many commands queued for one stream: drop that connection's queued
        commands of the stream; its reconnect catches up through POSITION."""
        _log.error(
            "More than {n} commands queued for stream {stream!r}; closing {conn}",
            n=self._limits.max_queued_commands_per_stream,
            stream=stream_name,
            conn=connection.describe(),
        )
        queue = self._queues.get(stream_name)
        if queue:
            kept = [item for item in queue if item[0] is not connection]
            queue.clear()
            queue.extend(kept)
        self._state.pop(connection, None)
        connection.close()

    def _handle(
        self, connection: IReplicationConnection, cmd: RdataCommand | PositionCommand
    ) -> Awaitable[None] | None:
        state = self._state.get(connection)
        if state is None:
            return None  # the connection is gone; a new one will catch up
        if type(cmd) is RdataCommand:
            return self._handle_rdata(state, connection, cmd)
        assert type(cmd) is PositionCommand
        return self._handle_position(state, connection, cmd)

    def _handle_rdata(
        self,
        state: _ConnectionState,
        connection: IReplicationConnection,
        cmd: RdataCommand,
    ) -> Awaitable[None] | None:
        key = (cmd.stream_name, cmd.instance_name)
        if key not in state.caught_up:
            # The POSITION that follows (or a retry) fetches these rows.
            if cmd.token is not None and cmd.token > state.dropped_upto.get(key, cmd.token - 1):
                state.dropped_upto[key] = cmd.token
            return None
        stream = self._streams[cmd.stream_name]
        try:
            row = stream.parse_row(cmd.row)
        except ReplicationError as e:
            _log.error(
                "Dropping malformed row of stream {stream!r} from {conn}: {e}",
                stream=cmd.stream_name,
                conn=connection.describe(),
                e=e,
            )
            row = None
        if cmd.token is None:
            if row is not None:
                batch = state.pending_batches.setdefault(key, [])
                if len(batch) >= self._limits.max_pending_batch_rows:
                    self._batch_overflow(state, connection, key)
                    return None
                batch.append(row)
            return None
        rows = state.pending_batches.pop(key, [])
        if row is not None:
            rows.append(row)
        position = self._data_handler.get_position(cmd.stream_name, cmd.instance_name)
        if (position is not None and cmd.token <= position) or not rows:
            return None
        metrics.count_rows_received(key, len(rows))
        return self._data_handler.on_rdata(cmd.stream_name, cmd.instance_name, cmd.token, rows)

    def _batch_overflow(
        self, state: _ConnectionState, connection: IReplicationConnection, key: _Key
    ) -> None:
        """A batch that never ends: drop it and stop accepting rows from that
        writer on this connection until a POSITION catches us up."""
        _log.error(
            "More than {n} rows in one batch of stream {stream!r} from {instance!r} "
            "on {conn}; dropping them until the next POSITION",
            n=self._limits.max_pending_batch_rows,
            stream=key[0],
            instance=key[1],
            conn=connection.describe(),
        )
        state.pending_batches.pop(key, None)
        state.caught_up.discard(key)

    def _handle_position(
        self,
        state: _ConnectionState,
        connection: IReplicationConnection,
        cmd: PositionCommand,
    ) -> Awaitable[None]:
        key = (cmd.stream_name, cmd.instance_name)
        state.caught_up.discard(key)
        state.pending_batches.pop(key, None)
        return self._catch_up_and_resume(state, connection, cmd, key)

    async def _catch_up_and_resume(
        self,
        state: _ConnectionState,
        connection: IReplicationConnection,
        cmd: PositionCommand,
        key: _Key,
    ) -> None:
        stream = self._streams[cmd.stream_name]
        dh = self._data_handler
        positioned = False
        # The position this POSITION leaves us at.
        target = cmd.new_token
        try:
            current = dh.get_position(cmd.stream_name, cmd.instance_name)
            if current is None:
                _log.info(
                    "First position of {stream!r} from {instance!r}: starting at {token} "
                    "(on {conn})",
                    stream=cmd.stream_name,
                    instance=cmd.instance_name,
                    token=cmd.new_token,
                    conn=connection.describe(),
                )
            elif current > cmd.new_token and cmd.prev_token < cmd.new_token:
                # Not a restart: a writer announces where it (re)starts with
                # POSITION T T (its answer to REPLICATE). This is what its
                # streamer was still publishing when that answer, taken
                # later, brought us past it. Nothing to fetch.
                _log.info(
                    "Stale POSITION of {stream!r} from {instance!r} ({prev} to {token}), "
                    "already at {current} (on {conn})",
                    stream=cmd.stream_name,
                    instance=cmd.instance_name,
                    prev=cmd.prev_token,
                    token=cmd.new_token,
                    current=current,
                    conn=connection.describe(),
                )
                target = current
            elif current > cmd.new_token:
                _log.warn(
                    "Stream {stream!r} of {instance!r} went back from {current} to "
                    "{token}: the writer restarted; refetching its rows (POSITION on {conn})",
                    stream=cmd.stream_name,
                    instance=cmd.instance_name,
                    current=current,
                    token=cmd.new_token,
                    conn=connection.describe(),
                )
                await _maybe(dh.on_stream_reset(cmd.stream_name, cmd.instance_name, RESET_FROM_TOKEN))
                await self._catch_up(
                    stream, cmd.instance_name, RESET_FROM_TOKEN, cmd.new_token, connection
                )
            elif current < cmd.prev_token:
                await self._catch_up(stream, cmd.instance_name, current, cmd.new_token, connection)
            await _maybe(dh.on_position(cmd.stream_name, cmd.instance_name, target))
            positioned = True
            # RDATA dropped while we were not caught up may be newer than the
            # POSITION (a retried catch-up): fetch up to it before accepting more.
            # Forget it only once fetched, so that a failure here is retried.
            dropped = state.dropped_upto.get(key)
            while dropped is not None and dropped > target:
                position = dh.get_position(cmd.stream_name, cmd.instance_name)
                assert position is not None
                await self._catch_up(stream, cmd.instance_name, position, dropped, connection)
                await _maybe(dh.on_position(cmd.stream_name, cmd.instance_name, dropped))
                if state.dropped_upto.get(key) == dropped:
                    del state.dropped_upto[key]
                dropped = state.dropped_upto.get(key)
            state.dropped_upto.pop(key, None)
        except Exception:
            self._retry_later(connection, cmd, positioned)
            raise
        self._retry_delays.pop((connection, key), None)
        if self._state.get(connection) is state:
            state.caught_up.add(key)

    async def _catch_up(
        self,
        stream: Stream[Any],
        instance_name: str,
        from_token: int,
        upto_token: int,
        connection: IReplicationConnection,
    ) -> None:
        """Deliver every row of `instance_name` in (from_token, upto_token]
        (for the POSITION that came on `connection`, named in the logs)."""
        _log.info(
            "Catching up {stream!r} of {instance!r} from {start} to {end} (POSITION on {conn})",
            stream=stream.NAME,
            instance=instance_name,
            start=from_token,
            end=upto_token,
            conn=connection.describe(),
        )
        token = from_token
        delivered = 0
        started = self._clock.seconds()
        update_function = stream.update_function
        fetch: ParsedUpdateFunction
        if isinstance(update_function, UpdateFunctionWithParsed):
            fetch = update_function.parsed
        else:

            async def fetch(
                instance_name: str, from_token: int, upto_token: int, count: int
            ) -> ParsedUpdateResult:
                updates, new_token, limited = await update_function(
                    instance_name, from_token, upto_token, count
                )
                return parse_updates(stream, updates), new_token, limited

        row_count = self._limits.catch_up_row_count
        on_rdata = self._data_handler.on_rdata
        name = stream.NAME
        next_page = _as_deferred(fetch(instance_name, token, upto_token, row_count))
        while True:
            groups, new_token, limited = await next_page
            if limited:
                if new_token <= token:
                    raise CatchUpError(
                        f"update function of {name!r} returned limited without "
                        f"progress at token {token}"
                    )
                # Fetch the next page (in the database thread) while this one
                # is delivered: at most two pages are held at once.
                next_page = _as_deferred(fetch(instance_name, new_token, upto_token, row_count))
            page_rows = 0
            try:
                for row_token, rows in groups:
                    page_rows += len(rows)
                    result = on_rdata(name, instance_name, row_token, rows)
                    if result is not None:
                        await result
            except BaseException:
                if limited:
                    # Nobody will wait for it; a retry fetches it again.
                    next_page.addErrback(lambda _: None)
                raise
            finally:
                if page_rows:
                    delivered += page_rows
                    metrics.count_rows_received((name, instance_name), page_rows)
                    metrics.count_catch_up_rows(name, page_rows)
            if not limited:
                break
            token = new_token
        metrics.observe_catch_up(stream.NAME, self._clock.seconds() - started)
        _log.info(
            "Caught up {stream!r} of {instance!r} to {end} ({n} rows; POSITION on {conn})",
            stream=stream.NAME,
            instance=instance_name,
            end=upto_token,
            n=delivered,
            conn=connection.describe(),
        )

    def _retry_later(
        self, connection: IReplicationConnection, cmd: PositionCommand, positioned: bool
    ) -> None:
        """A catch-up failed (the source timed out, say): try it again after a
        growing delay, as long as the connection lives. `positioned`: the
        POSITION itself was handled and the failure came while fetching up to
        dropped RDATA."""
        key = (cmd.stream_name, cmd.instance_name)
        metrics.count_catch_up_failure(cmd.stream_name)
        if connection not in self._state:
            # Lost while the catch-up ran: its next connection catches up.
            _log.info(
                "Catch-up of {stream!r} from {instance!r} failed after its connection "
                "was lost; not retried (POSITION on {conn})",
                stream=cmd.stream_name,
                instance=cmd.instance_name,
                conn=connection.describe(),
            )
            return
        delay = self._retry_delays.get((connection, key), self._limits.catch_up_retry_initial_s)
        self._retry_delays[(connection, key)] = min(delay * 2, self._limits.catch_up_retry_max_s)
        _log.warn(
            "Catch-up of {stream!r} from {instance!r} failed; retrying in {delay}s "
            "(POSITION on {conn})",
            stream=cmd.stream_name,
            instance=cmd.instance_name,
            delay=delay,
            conn=connection.describe(),
        )

        def retry() -> None:
            calls = self._retry_calls.get(connection)
            if calls is not None:
                calls.discard(call)
                if not calls:
                    del self._retry_calls[connection]
            state = self._state.get(connection)
            # Skip if the connection is gone or a later POSITION already caught
            # us up: replaying an old POSITION then would look like the stream
            # going backwards.
            if state is not None and key not in state.caught_up:
                retry_cmd = cmd
                current = self._data_handler.get_position(cmd.stream_name, cmd.instance_name)
                if positioned and current is not None and current > cmd.new_token:
                    # Rows past the POSITION were delivered before the failure:
                    # resume from them. Replaying the POSITION as it was would
                    # look like the stream going backwards (a reset).
                    retry_cmd = PositionCommand(
                        cmd.stream_name, cmd.instance_name, current, current
                    )
                self._submit(cmd.stream_name, connection, retry_cmd)

        call = self._clock.callLater(delay, retry)
        self._retry_calls.setdefault(connection, set()).add(call)

    # Commands this handler passes on untouched

    def _other(self, connection: IReplicationConnection, cmd: Command) -> HandlerResult:
        if self._on_other_command is None:
            return None
        return self._on_other_command(connection, cmd)

    def on_user_sync(self, connection: IReplicationConnection, cmd: UserSyncCommand) -> HandlerResult:
        return self._other(connection, cmd)

    def on_clear_user_sync(
        self, connection: IReplicationConnection, cmd: ClearUserSyncCommand
    ) -> HandlerResult:
        return self._other(connection, cmd)

    def on_federation_ack(
        self, connection: IReplicationConnection, cmd: FederationAckCommand
    ) -> HandlerResult:
        return self._other(connection, cmd)

    def on_user_ip(self, connection: IReplicationConnection, cmd: UserIpCommand) -> HandlerResult:
        return self._other(connection, cmd)

    def on_remote_server_up(
        self, connection: IReplicationConnection, cmd: RemoteServerUpCommand
    ) -> HandlerResult:
        return self._other(connection, cmd)

    def on_lock_released(
        self, connection: IReplicationConnection, cmd: LockReleasedCommand
    ) -> HandlerResult:
        return self._other(connection, cmd)

    def on_new_active_task(
        self, connection: IReplicationConnection, cmd: NewActiveTaskCommand
    ) -> HandlerResult:
        return self._other(connection, cmd)

    def on_cancel_task(
        self, connection: IReplicationConnection, cmd: CancelTaskCommand
    ) -> HandlerResult:
        return self._other(connection, cmd)


async def _maybe(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _as_deferred(result: Awaitable[T]) -> Deferred[T]:
    """`result` as a Deferred, started now (a coroutine runs to its first wait)."""
    if isinstance(result, Deferred):
        return result
    return Deferred.fromCoroutine(_await(result))

