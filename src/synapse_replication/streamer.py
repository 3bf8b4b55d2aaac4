# -*- test-case-name: tests.test_streamer -*-
"""`ReplicationStreamer`: turns new rows of the streams we write into commands.

Woken by `on_notifier_poke` after every commit, it asks each stream for the rows
since what it last published and sends them as RDATA; rows that share a token
go out with token ``batch`` except the last, so a reader delivers them
together. When a stream's token moved without rows (an id whose transaction
rolled back, say) it sends POSITION instead, so readers' tokens keep moving.

With nobody connected it still advances the streams' published positions: a
reader that connects later starts from its POSITION, and must not be sent rows
written before it connected.

A writer of a stream with several writers moves its position forward without
writing (it follows the others': see `storage.multi_writer`), and nothing pokes
the streamer for that. With `announce_positions_every_s` set (Synapse does it
every second for `events` writers) the streamer pokes itself that often, so a
moved position goes out as POSITION; a position that did not move sends
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from synapse_replication import metrics
from synapse_replication.commands import PositionCommand, RdataCommand
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.streams import (
    DEFAULT_TARGET_ROW_COUNT,
    Stream,
    group_updates_by_token,
)

_log: Final = Logger(namespace="synapse_replication.streamer")

# The `announce_positions_every_s` for a writer of `events` when the stream has
# several writers (Synapse's period).
EVENTS_WRITER_ANNOUNCE_EVERY_S: Final = 1.0


class ReplicationStreamer:
    """Publishes the streams this instance writes through a command handler."""

    def __init__(
        self,
        *,
        clock: IReactorTime,
        command_handler: ReplicationCommandHandler,
        streams: Sequence[Stream[Any]],
        target_row_count: int = DEFAULT_TARGET_ROW_COUNT,
        announce_positions_every_s: float | None = None,
    ) -> None:
        self._clock = clock
        self._handler = command_handler
        self._streams = list(streams)
        self._instance_name = command_handler.instance_name
        self._target_row_count = target_row_count
        self._pending = False
        self._running: Deferred[None] | None = None
        # Pokes itself periodically, for positions that move without a poke
        # (call `stop` to end it).
        self._announcer: LoopingCall | None = None
        if announce_positions_every_s is not None:
            if announce_positions_every_s <= 0:
                raise ValueError(
                    f"announce_positions_every_s must be positive: {announce_positions_every_s}"
                )
            self._announcer = LoopingCall(self.on_notifier_poke)
            self._announcer.clock = clock
            self._announcer.start(announce_positions_every_s, now=False)

    def stop(self) -> None:
        """Stop the periodic announcements, if any (idempotent). Pokes still
        publish."""
        if self._announcer is not None and self._announcer.running:
            self._announcer.stop()
        self._announcer = None

    def on_notifier_poke(self) -> None:
        """New rows may exist: publish them soon. Cheap, and safe to call from
        inside a write path; the work runs asynchronously and coalesces."""
        self._pending = True
        if self._running is None:
            running = Deferred.fromCoroutine(self._run())
            running.addErrback(lambda f: _log.failure("Replication streamer loop failed", f))
            # A run that finished at once has already cleared `_running` (in
            # `_run`'s finally): keeping its Deferred would block later pokes.
            if not running.called:
                self._running = running

    def is_idle(self) -> bool:
        """Nothing poked is left to publish."""
        return self._running is None and not self._pending

    def wait_until_idle(self) -> Deferred[None]:
        """Fires once everything poked so far has been published."""
        d: Deferred[None] = Deferred()
        if self._running is None:
            d.callback(None)
        else:
            self._running.addBoth(lambda _: d.callback(None))
        return d

    async def _run(self) -> None:
        try:
            while self._pending:
                self._pending = False
                if not self._handler.connected():
                    for stream in self._streams:
                        stream.discard_updates_and_advance()
                    continue
                for stream in self._streams:
                    try:
                        await self._publish(stream)
                    except Exception:
                        # One broken source must not stop the other streams; the
                        # next poke retries from the same published position.
                        _log.failure("Failed to publish stream {stream!r}", stream=stream.NAME)
        finally:
            self._running = None

    async def _publish(self, stream: Stream[Any]) -> None:
        while True:
            last_token = stream.last_token
            updates, current_token, limited = await stream.get_updates(self._target_row_count)
            if current_token == last_token:
                return
            if not updates:
                # The token moved without rows: say so, or readers' positions
                # would stay behind until the next row.
                self._handler.send_command(
                    PositionCommand(stream.NAME, self._instance_name, last_token, current_token)
                )
            else:
                send = self._handler.send_command
                name = stream.NAME
                instance = self._instance_name
                metrics.count_stream_updates(name, len(updates))
                for token, rows in group_updates_by_token(updates):
                    for row in rows[:-1]:
                        send(RdataCommand(name, instance, None, row))
                    send(RdataCommand(name, instance, token, rows[-1]))
                last_row_token = updates[-1][0]
                if last_row_token < current_token:
                    # The position went past the last row (ids that carry no
                    # row, or a writer that followed the others): say so.
                    send(PositionCommand(name, instance, last_row_token, current_token))
            if not limited:
                return
