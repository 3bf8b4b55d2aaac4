# -*- test-case-name: tests.storage.test_id_generators -*-
"""Stream id generators: hand out stream ids and say how far a stream is safe.

A writer takes an id, writes rows at it in a transaction, and gives it back
when the transaction is over. Transactions finish in any order, so the
stream's *current token* is not the last id handed out but the highest id
below which no id is still in flight. Invariant: a reader that has every row
up to the current token has every row it will ever see up to it; an id whose
transaction failed has no rows, so passing it is safe, but an id still in
flight always holds the token below it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final, Protocol, TypeVar

from twisted.logger import Logger

from synapse_replication.storage.database import Cursor, Database
from synapse_replication.storage.multi_writer import MultiWriterIdGenerator

T = TypeVar("T")

log: Final = Logger()

_IDENTIFIER: Final = re.compile(r"^[a-z_][a-z0-9_]*$")


class AbstractStreamIdGenerator(Protocol):
    """What stores and streams need from an id generator.

    Single-writer (`StreamIdGenerator`) and multi-writer (a PostgreSQL
    sequence shared by several writers) generators both provide this.
    """

    def get_next(self) -> AbstractAsyncContextManager[int]:
        """``async with gen.get_next() as stream_id:`` write rows at it."""
        ...

    def get_next_mult(self, n: int) -> AbstractAsyncContextManager[list[int]]:
        """``async with gen.get_next_mult(n) as ids:`` n ascending ids."""
        ...

    def get_current_token(self) -> int:
        """The position up to which every writer's rows are committed."""
        ...

    def get_current_token_for_writer(self, instance_name: str) -> int:
        """The position up to which `instance_name`'s rows are committed."""
        ...

    def get_positions(self) -> dict[str, int]:
        """Every known writer's position."""
        ...


class StreamIdGenerator:
    """Ids for a stream written by this one instance.

    Pure bookkeeping on the reactor thread (no locks, no reactor): ids are
    handed out in ascending order and tracked until their ``async with`` block
    exits, whether the block succeeded or raised. `on_advanced` is called each
    time the current token moves.
    """

    def __init__(
        self,
        instance_name: str,
        current_token: int,
        on_advanced: Callable[[], None] | None = None,
    ) -> None:
        self._instance_name = instance_name
        self._current_token = current_token
        self._last_allocated = current_token
        # Ids handed out and not yet given back, in ascending order (dicts keep
        # insertion order, and ids are inserted ascending): the first key is the
        # lowest id in flight.
        self._unfinished: dict[int, None] = {}
        self._on_advanced = on_advanced

    @classmethod
    async def create(
        cls,
        db: Database,
        instance_name: str,
        tables: Sequence[tuple[str, str]],
        *,
        stream_name: str,
        on_advanced: Callable[[], None] | None = None,
    ) -> StreamIdGenerator:
        """A generator starting after every id already used in the database.

        `tables` are the ``(table, column)`` pairs holding the stream's ids;
        the highest of them and of `stream_positions` (where writers record
        ids they passed without writing a row, see `record_unused_ids`) is the
        starting token, so no id a reader may have seen is handed out again.
        """
        for table, column in tables:
            if not (_IDENTIFIER.match(table) and _IDENTIFIER.match(column)):
                raise ValueError(f"not a plain SQL identifier: {table}.{column}")

        def read(cursor: Cursor) -> int:
            current = 0
            for table, column in tables:
                cursor.execute(f"SELECT MAX({column}) FROM {table}")
                row = cursor.fetchone()
                if row is not None and row[0] is not None:
                    current = max(current, int(row[0]))
            cursor.execute(
                "SELECT stream_id FROM stream_positions"
                " WHERE stream_name = ? AND instance_name = ?",
                (stream_name, instance_name),
            )
            row = cursor.fetchone()
            if row is not None:
                current = max(current, int(row[0]))
            return current

        current = await db.run_interaction(f"{stream_name}_id_gen_start", read)
        return cls(instance_name, current, on_advanced)

    @asynccontextmanager
    async def get_next(self) -> AsyncIterator[int]:
        """One new id, held in flight until the block exits."""
        async with self.get_next_mult(1) as ids:
            yield ids[0]

    @asynccontextmanager
    async def get_next_mult(self, n: int) -> AsyncIterator[list[int]]:
        """`n` consecutive new ids, held in flight until the block exits."""
        if n < 1:
            raise ValueError(f"get_next_mult needs at least one id, not {n}")
        first = self._last_allocated + 1
        ids = list(range(first, first + n))
        self._last_allocated = ids[-1]
        for stream_id in ids:
            self._unfinished[stream_id] = None
        try:
            yield ids
        finally:
            self._mark_finished(ids)

    def _mark_finished(self, ids: list[int]) -> None:
        for stream_id in ids:
            del self._unfinished[stream_id]
        if self._unfinished:
            new_token = next(iter(self._unfinished)) - 1
        else:
            new_token = self._last_allocated
        if new_token > self._current_token:
            self._current_token = new_token
            if self._on_advanced is not None:
                try:
                    self._on_advanced()
                except Exception:
                    # The write itself succeeded or failed on its own; a broken
                    # listener must not turn a committed write into an error.
                    log.failure("on_advanced callback failed")

    def get_current_token(self) -> int:
        return self._current_token

    def get_current_token_for_writer(self, instance_name: str) -> int:
        # One writer: its position is the stream's, whoever asks.
        return self._current_token

    def get_positions(self) -> dict[str, int]:
        return {self._instance_name: self._current_token}


def record_unused_ids(
    cursor: Cursor, stream_name: str, instance_name: str, stream_id: int
) -> None:
    """Remember in `stream_positions` that ids up to `stream_id` were used.

    A writer calls this when a transaction holding ids failed: the current
    token will pass those ids (readers may be told so in a POSITION) though no
    row holds them, and after a restart `StreamIdGenerator.create` must not
    hand them out again, or a reader already past them would drop new rows.
    """
    cursor.execute(
        "INSERT INTO stream_positions (stream_name, instance_name, stream_id)"
        " VALUES (?, ?, ?)"
        " ON CONFLICT (stream_name, instance_name) DO UPDATE"
        " SET stream_id = excluded.stream_id"
        " WHERE stream_positions.stream_id < excluded.stream_id",
        (stream_name, instance_name, stream_id),
    )


async def write_at_new_ids(
    db: Database,
    id_gen: AbstractStreamIdGenerator,
    *,
    stream_name: str,
    instance_name: str,
    count: int,
    desc: str,
    func: Callable[[Cursor, list[int]], T],
) -> T:
    """``func(cursor, ids)`` in one transaction, at `count` new stream ids.

    The ids stay in flight (holding the current token below them) until the
    transaction is over. If it fails, the ids are recorded as used (see
    `record_unused_ids`) before they are given back, and the error is raised.
    A `MultiWriterIdGenerator` records nothing here: its ids come from a
    sequence that never hands them out again, and `stream_positions` holds
    only positions it has reached (recording a failed id could claim one
    above ids still in flight).
    """
    async with id_gen.get_next_mult(count) as ids:
        try:
            return await db.run_interaction(desc, func, ids)
        except BaseException:
            if isinstance(id_gen, MultiWriterIdGenerator):
                raise
            try:
                await db.run_interaction(
                    f"{desc}_record_unused_ids",
                    record_unused_ids,
                    stream_name,
                    instance_name,
                    ids[-1],
                )
            except Exception:
                log.failure(
                    "Could not record unused {stream} ids up to {stream_id}",
                    stream=stream_name,
                    stream_id=ids[-1],
                )
            raise
