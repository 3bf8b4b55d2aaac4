# -*- test-case-name: tests.test_handler -*-
"""Where replicated rows end up: the interface user code implements.

The command handler calls `on_rdata` with every group of rows that share a
token, in token order per writer, exactly once, and `on_position` when a
writer's position moved without rows (or after a catch-up). Both may return an
awaitable; the next rows of that stream wait for it.

`ReplicationDataHandler` is the base to build on: it keeps the reader's
position per (stream, writer), which the command handler consults to decide
what it has already seen, and lets tests wait for a position.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Awaitable, Collection, Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

_log = Logger(namespace="synapse_replication.data_handler")

# A key in the position table: (stream name, writer instance name).
PositionKey = tuple[str, str]


class IReplicationDataHandler(Interface):
    """Receives rows and positions of the streams an instance follows."""

    def get_position(stream_name: str, instance_name: str) -> int | None:
        """The token up to which rows of that writer were handled, or None if
        nothing is known of it yet (a new reader then starts from the writer's
        announced position, not from the beginning of time)."""

    def on_rdata(
        stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> Awaitable[None] | None:
        """Typed rows that share `token`, written by `instance_name`."""

    def on_position(stream_name: str, instance_name: str, token: int) -> Awaitable[None] | None:
        """Every row of that writer up to `token` has been delivered."""

    def on_stream_reset(
        stream_name: str, instance_name: str, token: int
    ) -> Awaitable[None] | None:
        """The writer's stream went backwards (an in-memory stream whose writer
        restarted): drop what was held from it. The position is now `token`
        (where the refetch starts) and the writer's current rows follow
        through `on_rdata`."""


@implementer(IReplicationDataHandler)
class ReplicationDataHandler:
    """Position bookkeeping for a reader; subclass and override `process_rows`
    (and `process_reset`) to act on rows.

    The position of a (stream, writer) moves to a token only once the rows of
    that token were processed, so a failure in `process_rows` leaves the
    position where a retry can start.
    """

    def __init__(self, initial_positions: Mapping[PositionKey, int] | None = None) -> None:
        self._positions: dict[PositionKey, int] = dict(initial_positions or {})
        # Per key, a heap of (token, sequence number, waiter): `_advance`,
        # called for every token, only looks at the lowest one.
        self._waiters: dict[PositionKey, list[tuple[int, int, Deferred[None]]]] = {}
        self._waiter_count = itertools.count()

    def get_position(self, stream_name: str, instance_name: str) -> int | None:
        return self._positions.get((stream_name, instance_name))

    def positions(self) -> dict[PositionKey, int]:
        """A copy of every known position."""
        return dict(self._positions)

    def get_stream_token(self, stream_name: str, writers: Collection[str]) -> int | None:
        """The token up to which rows of every one of `writers` were handled:
        the lowest of their positions.

        None if `writers` is empty or any of them has no position yet: rows of
        a writer not heard from may lie anywhere, so no token is safe.
        """
        positions = [self._positions.get((stream_name, writer)) for writer in writers]
        if not positions or None in positions:
            return None
        return min(p for p in positions if p is not None)

    def process_rows(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> Awaitable[None] | None:
        """Act on rows; the default does nothing."""
        return None

    def process_reset(self, stream_name: str, instance_name: str, token: int) -> None:
        """Forget state held from a writer whose stream went backwards."""

    def on_rdata(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> Awaitable[None] | None:
        result = self.process_rows(stream_name, instance_name, token, rows)
        if result is None:
            self._advance(stream_name, instance_name, token)
            return None
        return self._advance_after(result, stream_name, instance_name, token)

    async def _advance_after(
        self, result: Awaitable[None], stream_name: str, instance_name: str, token: int
    ) -> None:
        await result
        self._advance(stream_name, instance_name, token)

    def on_position(self, stream_name: str, instance_name: str, token: int) -> None:
        self._advance(stream_name, instance_name, token)

    def on_stream_reset(self, stream_name: str, instance_name: str, token: int) -> None:
        self.process_reset(stream_name, instance_name, token)
        self._positions[(stream_name, instance_name)] = token

    def _advance(self, stream_name: str, instance_name: str, token: int) -> None:
        key = (stream_name, instance_name)
        if token > self._positions.get(key, token - 1):
            self._positions[key] = token
        if not self._waiters:
            return
        waiters = self._waiters.get(key)
        if waiters and waiters[0][0] <= self._positions[key]:
            position = self._positions[key]
            ready = []
            while waiters and waiters[0][0] <= position:
                ready.append(heapq.heappop(waiters)[2])
            if not waiters:
                del self._waiters[key]
            for d in ready:
                d.callback(None)

    def wait_for_stream_position(
        self, stream_name: str, instance_name: str, token: int
    ) -> Deferred[None]:
        """Fires once the position of that writer reaches `token` (waiters
        reached at once fire in token order, then in the order they came)."""
        d: Deferred[None] = Deferred()
        position = self.get_position(stream_name, instance_name)
        if position is not None and position >= token:
            d.callback(None)
        else:
            heapq.heappush(
                self._waiters.setdefault((stream_name, instance_name), []),
                (token, next(self._waiter_count), d),
            )
        return d


class SupportsAdvance(Protocol):
    """A stream id generator that learns other writers' positions
    (`storage.multi_writer.MultiWriterIdGenerator`)."""

    def advance(self, instance_name: str, new_id: int) -> None: ...


class WriterReplicationDataHandler(ReplicationDataHandler):
    """For an instance that writes streams with several writers: every
    position it reaches for another writer (through its rows or a POSITION)
    is also given to that stream's id generator, as Synapse does.

    That is how an idle writer's own position follows the others' (see
    `storage.multi_writer`). The generator hears of a position only once the
    rows up to it were processed.
    """

    def __init__(
        self,
        id_generators: Mapping[str, SupportsAdvance],
        initial_positions: Mapping[PositionKey, int] | None = None,
    ) -> None:
        super().__init__(initial_positions)
        self._id_generators = dict(id_generators)

    def _advance(self, stream_name: str, instance_name: str, token: int) -> None:
        super()._advance(stream_name, instance_name, token)
        id_gen = self._id_generators.get(stream_name)
        if id_gen is not None:
            id_gen.advance(instance_name, self._positions[(stream_name, instance_name)])
