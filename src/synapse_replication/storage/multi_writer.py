# -*- test-case-name: tests.storage.test_postgres_multi_writer -*-
"""Stream ids for a stream that several instances write (PostgreSQL only).

Every writer takes ids from one PostgreSQL sequence, so ids are unique across
writers, and each writer has its own *position*: a reader that has a writer's
rows up to its position has all of them. A stream's *current token* is the
lowest position of its writers.

Invariants (W is a writer, P(W) its position as W holds it in memory):

1. **Own position.** W has no uncommitted row at or below P(W) and never
   will: every id W took that is <= P(W) is finished, and every id W takes
   from now on is above P(W).

   Why it holds: a sequence created with ``CACHE 1`` (the default) returns
   from every ``nextval`` a value above every value it returned before, to
   any session. Every position anyone announces is at most an id some
   writer took (or a value loaded from the database, which is no higher),
   so every id W takes after it has *seen* a position p is above p. Hence
   W may claim:

   - with no id in flight: the highest position or id it has seen (the
     *idle jump*: a writer that does not write follows the others, so it
     never holds a reader's token at an old position);
   - otherwise: just below its lowest unfinished id, and, while a
     ``nextval`` is under way, no higher than what it had seen when that
     started (the id coming back is above that value, but may be below
     anything seen since).

   W's position says nothing about other writers' rows: a reader's token
   for the stream is the minimum over every writer's position.

2. **Persisted position.** ``stream_positions`` holds, per (stream, writer),
   a value W's position has reached (written after the fact, never ahead of
   it: writing an id inside its own transaction would claim it while lower
   ids of W may still be in flight). So another instance may take it as a
   lower bound of W's position.

3. **Announced position.** W publishes (as its current token, which the
   streamer turns into RDATA and POSITION) only positions already in
   ``stream_positions``. A write returns once its position is persisted; an
   idle jump is persisted at most every `persist_interval_s`. So a
   restarted W, which resumes from its persisted position, never goes back
   behind what a reader has seen (a reader would take that for a stream
   reset and fetch every row again).

4. **Start.** A writer restarting resumes from its persisted position (the
   transactions of its previous life died with it); a writer starting for
   the first time starts at the lowest persisted position of the other
   writers, and records its start in ``stream_positions`` before it takes
   an id. Both are safe by 1: it has nothing in flight, and its ids will be
   above everything it loaded. It then follows the idle jump. Starts are
   serialized by an advisory lock, so a writer missing from
   ``stream_positions`` had not started when we loaded: its ids will be
   above what we had seen then, which is the position we assume for it
   until it announces one. A configured writer that never starts holds the
   stream's current token there: nothing can prove it has no rows in flight.

Assumed: one live process per instance name (a second one would have ids in
flight that the first knows nothing of), and no writer taking ids any other
way (a stream that had a single writer, whose ids came from memory, must have
it stopped before several writers start: the sequence is then moved above
every id in the stream's tables).

Positions of other writers are learned through `advance`, from their RDATA
and POSITION commands (see `WriterReplicationDataHandler`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Final

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from synapse_replication.storage.database import Cursor, Database

log: Final = Logger()

_IDENTIFIER: Final = re.compile(r"^[a-z_][a-z0-9_]*$")

# Held while a generator loads its start positions, so that writers starting
# together see each other's start rows (an arbitrary constant).
_START_LOCK_KEY: Final = 0x5E_7A_5E_13


def _check_identifier(name: str) -> None:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain SQL identifier: {name}")


def _upsert_position(
    cursor: Cursor, stream_name: str, instance_name: str, stream_id: int
) -> None:
    """Raise `instance_name`'s persisted position to `stream_id` (never lower)."""
    cursor.execute(
        "INSERT INTO stream_positions (stream_name, instance_name, stream_id)"
        " VALUES (?, ?, ?)"
        " ON CONFLICT (stream_name, instance_name) DO UPDATE"
        " SET stream_id = excluded.stream_id"
        " WHERE stream_positions.stream_id < excluded.stream_id",
        (stream_name, instance_name, stream_id),
    )


def _next_ids(cursor: Cursor, sequence_name: str, n: int) -> list[int]:
    cursor.execute("SELECT nextval(?) FROM generate_series(1, ?)", (sequence_name, n))
    return sorted(int(row[0]) for row in cursor.fetchall())


def _max_allocated(cursor: Cursor, sequence_name: str) -> int:
    """The highest value the sequence has handed out (0 if none)."""
    cursor.execute(f"SELECT last_value, is_called FROM {sequence_name}")
    row = cursor.fetchone()
    assert row is not None
    last_value, is_called = int(row[0]), bool(row[1])
    return last_value if is_called else last_value - 1


class MultiWriterIdGenerator:
    """Ids and positions of one stream with several writers, for one instance.

    Implements `AbstractStreamIdGenerator`. Lives on the reactor thread (no
    locks); an instance that is not among `writers` only tracks positions and
    cannot take ids. Build it with `create`; `stop` it before closing the
    database.
    """

    def __init__(
        self,
        *,
        db: Database,
        clock: IReactorTime,
        instance_name: str,
        stream_name: str,
        sequence_name: str,
        writers: Collection[str],
        own_position: int,
        other_positions: dict[str, int],
        max_seen: int,
        on_advanced: Callable[[], None] | None = None,
        persist_interval_s: float = 0.5,
    ) -> None:
        if persist_interval_s < 0:
            raise ValueError(f"persist_interval_s must not be negative: {persist_interval_s}")
        self._db = db
        self._clock = clock
        self._instance_name = instance_name
        self._stream_name = stream_name
        self._sequence_name = sequence_name
        self._writers = frozenset(writers)
        self._is_writer = instance_name in self._writers
        self._on_advanced = on_advanced
        self._persist_interval_s = persist_interval_s

        # Other writers' positions: loaded, assumed (see invariant 4), then
        # raised by `advance`.
        self._others = dict(other_positions)
        # The highest position or id of any writer this instance has seen.
        self._max_seen = max(max_seen, own_position)
        # Our own position in memory (invariant 1) and as persisted (2, 3).
        self._position = own_position
        self._persisted = own_position
        # Ids taken and not yet finished.
        self._unfinished: set[int] = set()
        # For each `nextval` under way, `_max_seen` when it started: the ids
        # it returns are above it, so our position may not pass it.
        self._fetch_floors: list[int] = []

        self._persist_running = False
        self._persist_waiters: list[Deferred[None]] = []
        self._persist_call: IDelayedCall | None = None
        self._stopped = False
        self._recompute()
        self._persist_soon()

    @classmethod
    async def create(
        cls,
        db: Database,
        clock: IReactorTime,
        *,
        instance_name: str,
        stream_name: str,
        sequence_name: str,
        tables: Sequence[tuple[str, str]],
        writers: Collection[str],
        on_advanced: Callable[[], None] | None = None,
        persist_interval_s: float = 0.5,
    ) -> MultiWriterIdGenerator:
        """A generator for `stream_name`, whose ids come from `sequence_name`.

        `tables` are the ``(table, column)`` pairs holding the stream's ids
        (each table also has an ``instance_name`` column); the sequence is
        moved above every id in them if it is behind (a stream that had one
        writer before). `writers` are every instance that writes the stream.
        `on_advanced` is called after each write, once its position is
        persisted.
        """
        for table, column in tables:
            _check_identifier(table)
            _check_identifier(column)
        _check_identifier(sequence_name)
        writer_set = frozenset(writers)
        if not writer_set:
            raise ValueError(f"stream {stream_name!r} needs at least one writer")
        is_writer = instance_name in writer_set

        def load(cursor: Cursor) -> tuple[int, dict[str, int], int]:
            cursor.execute("SELECT pg_advisory_xact_lock(?)", (_START_LOCK_KEY,))
            max_id = 0
            own_max_id = 0
            for table, column in tables:
                cursor.execute(f"SELECT MAX({column}) FROM {table}")
                row = cursor.fetchone()
                if row is not None and row[0] is not None:
                    max_id = max(max_id, int(row[0]))
                cursor.execute(
                    f"SELECT MAX({column}) FROM {table} WHERE instance_name = ?",
                    (instance_name,),
                )
                row = cursor.fetchone()
                if row is not None and row[0] is not None:
                    own_max_id = max(own_max_id, int(row[0]))
            cursor.execute(
                "SELECT instance_name, stream_id FROM stream_positions"
                " WHERE stream_name = ?",
                (stream_name,),
            )
            persisted = {str(name): int(stream_id) for name, stream_id in cursor.fetchall()}
            max_id = max(max_id, *persisted.values(), 0)
            if _max_allocated(cursor, sequence_name) < max_id:
                cursor.execute("SELECT setval(?, ?)", (sequence_name, max_id))

            own = persisted.pop(instance_name, None)
            known_writers = [p for name, p in persisted.items() if name in writer_set]
            if own is None:
                own = min(known_writers, default=0)
            # Seen: every persisted position, and our own committed rows
            # (finished ids of ours, committed after our last persisted
            # position if the previous process died in between).
            max_seen = max(own, own_max_id, *persisted.values(), 0)
            others = dict(persisted)
            for writer in writer_set - {instance_name}:
                others.setdefault(writer, max_seen)
            if is_writer:
                _upsert_position(cursor, stream_name, instance_name, own)
            return own, others, max_seen

        own, others, max_seen = await db.run_interaction(
            f"{stream_name}_multi_writer_id_gen_start", load
        )
        return cls(
            db=db,
            clock=clock,
            instance_name=instance_name,
            stream_name=stream_name,
            sequence_name=sequence_name,
            writers=writer_set,
            own_position=own if is_writer else 0,
            other_positions=others,
            max_seen=max_seen,
            on_advanced=on_advanced,
            persist_interval_s=persist_interval_s,
        )

    # Taking ids

    @asynccontextmanager
    async def get_next(self) -> AsyncIterator[int]:
        """One new id, held in flight until the block exits."""
        async with self.get_next_mult(1) as ids:
            yield ids[0]

    @asynccontextmanager
    async def get_next_mult(self, n: int) -> AsyncIterator[list[int]]:
        """`n` new ascending ids (not necessarily consecutive: other writers
        take ids from the same sequence), held in flight until the block
        exits. On exit, whether the block succeeded or raised, the ids are
        finished, the new position is persisted and `on_advanced` called."""
        if n < 1:
            raise ValueError(f"get_next_mult needs at least one id, not {n}")
        if not self._is_writer:
            raise RuntimeError(
                f"{self._instance_name!r} is not a writer of stream {self._stream_name!r}"
            )
        if self._stopped:
            raise RuntimeError(f"id generator of {self._stream_name!r} is stopped")
        floor = self._max_seen
        self._fetch_floors.append(floor)
        try:
            ids = await self._db.run_interaction(
                f"{self._stream_name}_next_ids", _next_ids, self._sequence_name, n
            )
            self._unfinished.update(ids)
            self._max_seen = max(self._max_seen, ids[-1])
        finally:
            # A fetch that failed (or whose caller was cancelled) took ids
            # nobody will write at: passing them is safe.
            self._fetch_floors.remove(floor)
            self._recompute()
        try:
            yield ids
        finally:
            self._unfinished.difference_update(ids)
            self._recompute()
            await self._wait_persisted(self._position)
            self._call_on_advanced()

    def _recompute(self) -> None:
        """Move our position as far as invariant 1 allows."""
        if not self._is_writer:
            return
        bound = self._max_seen
        if self._unfinished:
            bound = min(bound, min(self._unfinished) - 1)
        if self._fetch_floors:
            bound = min(bound, *self._fetch_floors)
        if bound > self._position:
            self._position = bound

    def _call_on_advanced(self) -> None:
        if self._on_advanced is None:
            return
        try:
            self._on_advanced()
        except Exception:
            log.failure("on_advanced callback failed")

    # Persisting our position

    def _persist_soon(self) -> None:
        """Persist an idle jump after `persist_interval_s`, unless a persist is
        already due or running (which will take the new position along)."""
        if (
            self._stopped
            or self._position <= self._persisted
            or self._persist_call is not None
            or self._persist_running
        ):
            return
        self._persist_call = self._clock.callLater(self._persist_interval_s, self._persist_now)

    def _persist_now(self) -> None:
        self._persist_call = None
        if not self._persist_running:
            Deferred.fromCoroutine(self._persist_loop())

    def _wait_persisted(self, target: int) -> Deferred[None]:
        """Fires once `target` is persisted, or once persisting it failed (the
        failure is logged: a committed write must not turn into an error)."""
        if self._persisted >= target or self._stopped:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._persist_waiters.append(d)
        if self._persist_call is not None:
            self._persist_call.cancel()
        self._persist_now()
        return d

    async def _persist_loop(self) -> None:
        self._persist_running = True
        failed = False
        try:
            while self._position > self._persisted and not self._stopped:
                target = self._position
                try:
                    await self._db.run_interaction(
                        f"{self._stream_name}_persist_position",
                        _upsert_position,
                        self._stream_name,
                        self._instance_name,
                        target,
                    )
                except Exception:
                    log.failure(
                        "Could not persist the {stream} position {position} of {instance}",
                        stream=self._stream_name,
                        position=target,
                        instance=self._instance_name,
                    )
                    failed = True
                    break
                self._persisted = max(self._persisted, target)
        finally:
            self._persist_running = False
            waiters, self._persist_waiters = self._persist_waiters, []
            for d in waiters:
                d.callback(None)
        if failed:
            self._persist_soon()

    def stop(self) -> None:
        """Stop persisting idle jumps (before closing the database); ids can
        no longer be taken. Idempotent."""
        self._stopped = True
        if self._persist_call is not None:
            self._persist_call.cancel()
            self._persist_call = None

    # Positions

    def advance(self, instance_name: str, new_id: int) -> None:
        """`instance_name` has written (or passed) everything up to `new_id`:
        from its RDATA or POSITION. Raises what we know of it, and our own
        position by the idle jump (persisted, and so announced, later)."""
        if instance_name == self._instance_name:
            return  # ours is computed here, not learned
        if new_id > self._others.get(instance_name, new_id - 1):
            self._others[instance_name] = new_id
        if new_id > self._max_seen:
            self._max_seen = new_id
        self._recompute()
        self._persist_soon()

    def get_current_token(self) -> int:
        """The lowest position of the stream's writers: every row at or below
        it is committed, whoever wrote it. Our own position counts as held in
        memory (it is about rows committed here)."""
        positions = [self._others[w] for w in self._writers if w != self._instance_name]
        if self._is_writer:
            positions.append(self._position)
        return min(positions)

    def get_persisted_upto_position(self) -> int:
        """Synapse's name for `get_current_token`."""
        return self.get_current_token()

    def get_current_token_for_writer(self, instance_name: str) -> int:
        """A writer's position. Our own is the one persisted (invariant 3: the
        only one we may announce); an instance we know nothing of is at the
        stream's current token."""
        if instance_name == self._instance_name and self._is_writer:
            return self._persisted
        position = self._others.get(instance_name)
        return self.get_current_token() if position is None else position

    def get_local_position(self) -> int:
        """Our own position as held in memory (at or above the persisted one)."""
        return self._position

    def get_positions(self) -> dict[str, int]:
        """Every known writer's position (ours as persisted)."""
        positions = dict(self._others)
        if self._is_writer:
            positions[self._instance_name] = self._persisted
        return positions

    async def get_max_allocated_token(self) -> int:
        """The highest id any writer has taken (from the sequence)."""
        return await self._db.run_interaction(
            f"{self._stream_name}_max_allocated", _max_allocated, self._sequence_name
        )
