# -*- test-case-name: tests.storage.test_events -*-
"""The events store: persists events and current-state changes, and is the
source of the `events` stream's rows.

One token space, the events `stream_ordering`, is shared by three sources:

- every persisted event has its own `stream_ordering` and an ``ev`` row there
  (outliers too, with ``outlier`` set: Synapse sends them, and readers skip
  what they do not want);
- current-state changes (`current_state_delta_stream`) are stamped with a
  `stream_ordering`: the event's own one, the batch's first one when the
  caller passes the batch's state delta (as Synapse does), or a fresh one when
  the state changes without a new event (`update_current_state`);
- an outlier that becomes a real event (`de_outlier_events`) gets an
  `ex_outlier_stream` row, and an ``ev`` row, at a fresh `stream_ordering`.

`get_updates` is the stream's update function. Invariant: for any limit it
returns every row in ``(from_token, new_upto_token]`` and never part of one
token's rows, so the pages of any paging concatenate to the unpaged rows.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, Final

import attrs
from twisted.internet.defer import DeferredLock

from synapse_replication._accel import SPEEDUPS
from synapse_replication._fastattrs import fast_constructor
from synapse_replication._json import JsonValue, encode_json
from synapse_replication.storage._paging import page_whole_tokens
from synapse_replication.storage.database import Cursor, Database
from synapse_replication.storage.id_generators import (
    AbstractStreamIdGenerator,
    write_at_new_ids,
)
from synapse_replication.streams._base import (
    StreamUpdate,
    StreamUpdateResult,
    Token,
    UpdateFunction,
    group_updates_by_token,
)
from synapse_replication.streams.events import (
    EventsStreamAllStateRow,
    EventsStreamCurrentStateRow,
    EventsStreamEventRow,
)
from synapse_replication.streams.parsed import (
    ParsedGroup,
    ParsedUpdateResult,
    UpdateFunctionWithParsed,
)

EVENTS_STREAM_NAME: Final = "events"

# The tables holding events stream ids, for `StreamIdGenerator.create`.
EVENTS_ID_TABLES: Final = (
    ("events", "stream_ordering"),
    ("current_state_delta_stream", "stream_id"),
    ("ex_outlier_stream", "event_stream_ordering"),
)

# A room with at least this many state changes at one token gets a single
# ``state-all`` row there instead of one ``state`` row per change.
MAX_STATE_UPDATES_PER_ROOM: Final = 150

MEMBER_EVENT_TYPE: Final = "m.room.member"
REDACTION_EVENT_TYPE: Final = "m.room.redaction"

# (event type, state key) -> event id, or None where the key is removed.
StateKey = tuple[str, str]
StateChanges = Mapping[StateKey, str | None]


def _check_event(event: EventToPersist) -> None:
    if event.membership is not None and (
        event.type != MEMBER_EVENT_TYPE or event.state_key is None
    ):
        raise ValueError(
            f"{event.event_id}: membership is only for {MEMBER_EVENT_TYPE} "
            "state events (the target user is the state key)"
        )
    if (
        event.type == MEMBER_EVENT_TYPE
        and event.state_key is not None
        and event.membership is None
    ):
        raise ValueError(f"{event.event_id}: a member event needs a membership")
    if event.redacts is not None and event.type != REDACTION_EVENT_TYPE:
        raise ValueError(
            f"{event.event_id}: redacts is only for {REDACTION_EVENT_TYPE} events"
        )
    if (event.relates_to is None) != (event.relation_type is None):
        raise ValueError(f"{event.event_id}: relates_to and relation_type go together")


@attrs.frozen(kw_only=True)
class EventToPersist:
    """An event to persist, with what the stream and the state tables need.

    As in Synapse, a rejected event is stored with its state key but without
    its membership, redaction or relation, and never changes current state;
    an outlier is stored and streamed but never changes current state either.
    """

    event_id: str
    room_id: str
    type: str
    sender: str
    state_key: str | None = None
    redacts: str | None = None
    relates_to: str | None = None
    relation_type: str | None = None
    membership: str | None = None
    rejected: bool = False
    outlier: bool = False
    origin_server_ts: int = 0
    depth: int = 0
    content: Mapping[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        _check_event(self)

    def to_json(self) -> dict[str, Any]:
        """The event as stored in `event_json`."""
        event: dict[str, Any] = {
            "event_id": self.event_id,
            "room_id": self.room_id,
            "type": self.type,
            "sender": self.sender,
            "origin_server_ts": self.origin_server_ts,
            "depth": self.depth,
            "content": dict(self.content),
        }
        if self.state_key is not None:
            event["state_key"] = self.state_key
        if self.redacts is not None:
            event["redacts"] = self.redacts
        return event


# The columns of an ``ev`` row after its token, as Synapse selects them. The
# tables joined hold at most one row per event, so an event is one row.
_EV_COLUMNS: Final = """
    e.event_id, e.room_id, e.type, se.state_key, r.redacts, er.relates_to_id,
    rm.membership, rej.reason IS NOT NULL, e.outlier
"""
_EV_JOINS: Final = """
    LEFT JOIN redactions AS r ON r.event_id = e.event_id
    LEFT JOIN state_events AS se ON se.event_id = e.event_id
    LEFT JOIN event_relations AS er ON er.event_id = e.event_id
    LEFT JOIN room_memberships AS rm ON rm.event_id = e.event_id
    LEFT JOIN rejections AS rej ON rej.event_id = e.event_id
"""
_NEW_EVENTS_SQL: Final = f"""
    SELECT e.stream_ordering, {_EV_COLUMNS}
    FROM events AS e {_EV_JOINS}
    WHERE ? < e.stream_ordering AND e.stream_ordering <= ? AND e.instance_name = ?
    ORDER BY e.stream_ordering ASC
"""
_EX_OUTLIERS_SQL: Final = f"""
    SELECT o.event_stream_ordering, {_EV_COLUMNS}
    FROM events AS e
    INNER JOIN ex_outlier_stream AS o ON o.event_id = e.event_id
    {_EV_JOINS}
    WHERE ? < o.event_stream_ordering AND o.event_stream_ordering <= ?
        AND o.instance_name = ?
    ORDER BY o.event_stream_ordering ASC
"""
# Rows of one token are ordered too, so that every query path agrees.
_STATE_DELTAS_SQL: Final = """
    SELECT stream_id, room_id, type, state_key, event_id
    FROM current_state_delta_stream
    WHERE ? < stream_id AND stream_id <= ? AND instance_name = ?
    ORDER BY stream_id ASC, room_id ASC, type ASC, state_key ASC
"""
_STATE_DELTAS_AT_SQL: Final = """
    SELECT stream_id, room_id, type, state_key, event_id
    FROM current_state_delta_stream
    WHERE stream_id = ? AND instance_name = ?
    ORDER BY room_id ASC, type ASC, state_key ASC
"""


@attrs.frozen
class _RowForm:
    """The form a page's rows are handed over in: the JSON form of
    `get_updates`, or the parsed one of `get_parsed_updates`.

    `ev`, `state` and `state_all` make each kind of row for `_merge_updates`,
    whose ``(token, row)`` list `finish` turns into the page; `events_page`
    makes the page at once when it holds new events only (nearly always).
    """

    ev: Callable[[tuple[Any, ...]], Any]
    state: Callable[[tuple[Any, ...]], Any]
    state_all: Callable[[str], Any]
    events_page: Callable[[list[tuple[Any, ...]]], list[Any]]
    finish: Callable[[list[tuple[Token, Any]]], list[Any]]


_JSON_ROWS: Final = _RowForm(
    ev=lambda row: ["ev", list(row[1:])],
    state=lambda row: ["state", list(row[1:])],
    state_all=lambda room_id: ["state-all", [room_id]],
    events_page=lambda rows: [(row[0], ["ev", list(row[1:])]) for row in rows],
    finish=lambda updates: updates,
)
# The rows `EventsStream.parse_row` makes from the JSON form, built from the
# columns: they are what `parse_row` checks, as stored, and the booleans come
# as 0/1 (SQLite) or bools (PostgreSQL).
# Built with `fast_constructor`: the columns are already what the fields
# hold (this store wrote them), so no check is skipped that would catch anything.
_new_ev_row: Final = fast_constructor(EventsStreamEventRow)
_new_state_row: Final = fast_constructor(EventsStreamCurrentStateRow)
def _ev_groups_py(rows: list[tuple[Any, ...]]) -> list[ParsedGroup]:
    """One ``(token, [ev row])`` group per events row: a page of new events
    only, which has one event per token."""
    row = _new_ev_row
    return [
        (r[0], [row(r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), bool(r[9]))])
        for r in rows
    ]


# The C twin builds the groups without a Python frame per row, in about half
# the time (0.2 against 0.4 µs a row, timed alone): a small part of a
# catch-up's cost per row, most of which is the query and the objects.
_ev_groups: Final[Callable[[list[tuple[Any, ...]]], list[ParsedGroup]]] = (
    _ev_groups_py
    if SPEEDUPS is None
    else functools.partial(SPEEDUPS.group_rows, _new_ev_row, b"ooooooobb")
)
_PARSED_ROWS: Final = _RowForm(
    ev=lambda r: _new_ev_row(r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]), bool(r[9])),
    state=lambda row: _new_state_row(row[1], row[2], row[3], row[4]),
    state_all=EventsStreamAllStateRow,
    events_page=_ev_groups,
    finish=lambda updates: list(group_updates_by_token(updates)),
)


def _state_updates(
    rows: Iterable[tuple[Any, ...]], form: _RowForm
) -> Iterator[tuple[Token, Any]]:
    """``state`` rows, or one ``state-all`` row where a room has at least
    MAX_STATE_UPDATES_PER_ROOM changes at one token.

    `rows` are ordered by token then room. ``state-all`` rows follow the
    ``state`` rows of their token, as in Synapse.
    """
    by_token: dict[int, dict[str, list[tuple[Any, ...]]]] = {}
    for row in rows:
        by_token.setdefault(row[0], {}).setdefault(row[1], []).append(row)
    for token, rooms in by_token.items():
        whole_rooms: list[str] = []
        for room_id, room_rows in rooms.items():
            if len(room_rows) >= MAX_STATE_UPDATES_PER_ROOM:
                whole_rooms.append(room_id)
            else:
                for row in room_rows:
                    yield token, form.state(row)
        for room_id in whole_rooms:
            yield token, form.state_all(room_id)


def _write_state_changes(
    cursor: Cursor,
    stream_id: int,
    instance_name: str,
    room_id: str,
    changes: Iterable[tuple[StateKey, str | None]],
) -> None:
    """Record `changes` at `stream_id` and apply them to the current state.

    The delta row's `prev_event_id` is read before the current state changes.
    """
    for (event_type, state_key), event_id in changes:
        cursor.execute(
            "INSERT INTO current_state_delta_stream"
            " (stream_id, instance_name, room_id, type, state_key, event_id,"
            "  prev_event_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ("
            "  SELECT event_id FROM current_state_events"
            "  WHERE room_id = ? AND type = ? AND state_key = ?))",
            (
                stream_id,
                instance_name,
                room_id,
                event_type,
                state_key,
                event_id,
                room_id,
                event_type,
                state_key,
            ),
        )
        cursor.execute(
            "DELETE FROM current_state_events"
            " WHERE room_id = ? AND type = ? AND state_key = ?",
            (room_id, event_type, state_key),
        )
        if event_id is not None:
            cursor.execute(
                "INSERT INTO current_state_events"
                " (event_id, room_id, type, state_key, membership)"
                " VALUES (?, ?, ?, ?,"
                "  (SELECT membership FROM room_memberships WHERE event_id = ?))",
                (event_id, room_id, event_type, state_key, event_id),
            )


class EventsStore:
    """Writes events and state for one writer instance, and reads them back
    as `events` stream rows.

    Every write is one transaction at ids from `id_gen`, which must be the
    events stream's generator; `notify` is called after each committed write
    (it is a poke: cheap, and harmless if it comes more than once).
    """

    def __init__(
        self,
        db: Database,
        id_gen: AbstractStreamIdGenerator,
        instance_name: str,
        notify: Callable[[], None],
    ) -> None:
        self._db = db
        self._id_gen = id_gen
        self._instance_name = instance_name
        self._notify = notify
        # The `events` stream's update function (see the module docstring),
        # whose rows a catch-up takes parsed, from `get_parsed_updates`
        # (an `UpdateFunctionWithParsed`, typed plainly so that it mixes with
        # other update functions in one mapping).
        self.get_updates: Final[UpdateFunction] = UpdateFunctionWithParsed(
            self._get_updates, self.get_parsed_updates
        )
        # Writes that change a room's current state, one at a time per room.
        self._room_locks: dict[str, DeferredLock] = {}

    async def _write(
        self,
        count: int,
        desc: str,
        func: Callable[[Cursor, list[int]], None],
        state_rooms: Iterable[str] = (),
    ) -> list[int]:
        """Run `func` in one transaction at `count` new ids. Writes that
        change the current state of a room in `state_rooms` wait for each
        other, from before their ids are taken to their commit: on
        PostgreSQL two at once would race (the second's insert of a key
        fails on the unique constraint), and the later ids must be the ones
        that win (Synapse serializes a room's persistence the same way)."""

        def run(cursor: Cursor, ids: list[int]) -> list[int]:
            func(cursor, ids)
            return ids

        held: list[tuple[str, DeferredLock]] = []
        try:
            # In one order, so that two writes of several rooms cannot deadlock.
            for room_id in sorted(set(state_rooms)):
                lock = self._room_locks.setdefault(room_id, DeferredLock())
                await lock.acquire()
                held.append((room_id, lock))
            ids = await write_at_new_ids(
                self._db,
                self._id_gen,
                stream_name=EVENTS_STREAM_NAME,
                instance_name=self._instance_name,
                count=count,
                desc=desc,
                func=run,
            )
        finally:
            for room_id, lock in reversed(held):
                lock.release()
                if not lock.locked and not lock.waiting and self._room_locks.get(room_id) is lock:
                    del self._room_locks[room_id]
        self._notify()
        return ids

    async def persist_events(
        self,
        events: Sequence[EventToPersist],
        state_delta: Mapping[str, StateChanges] | None = None,
    ) -> list[int]:
        """Store `events` in one transaction; their stream orderings, in order.

        Current state: with `state_delta` None, each accepted (not rejected,
        not outlier) state event becomes the current state of its key, at its
        own stream ordering. Otherwise `state_delta` maps room ids to the
        changes the batch makes to their current state (computed by the
        caller's state resolution), all recorded at the batch's first stream
        ordering, as Synapse does: those ``state`` rows may come before the
        ``ev`` rows of the events they name.

        An event id that is already stored fails the whole call.
        """
        if not events:
            if state_delta:
                raise ValueError("a state delta needs events; use update_current_state")
            return []
        instance_name = self._instance_name

        def persist(cursor: Cursor, ids: list[int]) -> None:
            for event, stream_ordering in zip(events, ids, strict=True):
                self._insert_event(cursor, event, stream_ordering)
            if state_delta is None:
                for event, stream_ordering in zip(events, ids, strict=True):
                    if (
                        event.state_key is not None
                        and not event.rejected
                        and not event.outlier
                    ):
                        _write_state_changes(
                            cursor,
                            stream_ordering,
                            instance_name,
                            event.room_id,
                            [((event.type, event.state_key), event.event_id)],
                        )
            else:
                for room_id, changes in state_delta.items():
                    _write_state_changes(
                        cursor, ids[0], instance_name, room_id, changes.items()
                    )

        if state_delta is None:
            state_rooms = [
                e.room_id
                for e in events
                if e.state_key is not None and not e.rejected and not e.outlier
            ]
        else:
            state_rooms = list(state_delta)
        return await self._write(len(events), "persist_events", persist, state_rooms)

    def _insert_event(
        self, cursor: Cursor, event: EventToPersist, stream_ordering: int
    ) -> None:
        cursor.execute(
            "INSERT INTO events (stream_ordering, topological_ordering, event_id,"
            " type, room_id, sender, state_key, origin_server_ts, instance_name,"
            " outlier) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                stream_ordering,
                event.depth,
                event.event_id,
                event.type,
                event.room_id,
                event.sender,
                event.state_key,
                event.origin_server_ts,
                self._instance_name,
                event.outlier,
            ),
        )
        cursor.execute(
            "INSERT INTO event_json (event_id, room_id, json) VALUES (?, ?, ?)",
            (event.event_id, event.room_id, encode_json(event.to_json())),
        )
        if event.state_key is not None:
            cursor.execute(
                "INSERT INTO state_events (event_id, room_id, type, state_key)"
                " VALUES (?, ?, ?, ?)",
                (event.event_id, event.room_id, event.type, event.state_key),
            )
        if event.rejected:
            cursor.execute(
                "INSERT INTO rejections (event_id, reason) VALUES (?, ?)",
                (event.event_id, "rejected"),
            )
            return
        if event.redacts is not None:
            cursor.execute(
                "INSERT INTO redactions (event_id, redacts) VALUES (?, ?)",
                (event.event_id, event.redacts),
            )
        if event.relates_to is not None:
            cursor.execute(
                "INSERT INTO event_relations (event_id, relates_to_id, relation_type)"
                " VALUES (?, ?, ?)",
                (event.event_id, event.relates_to, event.relation_type),
            )
        if event.membership is not None:
            cursor.execute(
                "INSERT INTO room_memberships"
                " (event_id, user_id, sender, room_id, membership)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    event.event_id,
                    event.state_key,
                    event.sender,
                    event.room_id,
                    event.membership,
                ),
            )

    async def update_current_state(
        self, room_id: str, changes: StateChanges
    ) -> int | None:
        """Change a room's current state without a new event (a state reset,
        a re-resolution): all `changes` at one fresh stream id, returned.

        No changes: nothing is written and None is returned.
        """
        if not changes:
            return None
        instance_name = self._instance_name
        items = list(changes.items())

        def update(cursor: Cursor, ids: list[int]) -> None:
            _write_state_changes(cursor, ids[0], instance_name, room_id, items)

        (stream_id,) = await self._write(1, "update_current_state", update, [room_id])
        return stream_id

    async def de_outlier_events(self, event_ids: Sequence[str]) -> list[int]:
        """Turn stored outliers into real events: their new stream ids, in order.

        Each gets an `ex_outlier_stream` row (and so an ``ev`` row) at a fresh
        id; its own `stream_ordering` does not change. Current state is not
        touched (use `update_current_state`). An unknown event or one that is
        not an outlier fails the whole call.
        """
        if not event_ids:
            return []
        instance_name = self._instance_name

        def de_outlier(cursor: Cursor, ids: list[int]) -> None:
            for event_id, stream_id in zip(event_ids, ids, strict=True):
                cursor.execute(
                    "SELECT outlier FROM events WHERE event_id = ?", (event_id,)
                )
                row = cursor.fetchone()
                if row is None:
                    raise ValueError(f"unknown event {event_id}")
                if not row[0]:
                    raise ValueError(f"event {event_id} is not an outlier")
                cursor.execute(
                    "UPDATE events SET outlier = ? WHERE event_id = ?",
                    (False, event_id),
                )
                cursor.execute(
                    "INSERT INTO ex_outlier_stream"
                    " (event_stream_ordering, event_id, state_group, instance_name)"
                    " VALUES (?, ?, NULL, ?)",
                    (stream_id, event_id, instance_name),
                )

        return await self._write(len(event_ids), "de_outlier_events", de_outlier)

    def current_token(self, instance_name: str) -> Token:
        """The events stream's current token for writer `instance_name`."""
        return self._id_gen.get_current_token_for_writer(instance_name)

    async def _get_updates(
        self,
        instance_name: str,
        from_token: Token,
        upto_token: Token,
        target_row_count: int,
    ) -> StreamUpdateResult:
        """`get_updates` in JSON form (see the module docstring)."""
        return await self._page(
            "get_events_updates", _JSON_ROWS, instance_name, from_token, upto_token, target_row_count
        )

    async def get_parsed_updates(
        self,
        instance_name: str,
        from_token: Token,
        upto_token: Token,
        target_row_count: int,
    ) -> ParsedUpdateResult:
        """`get_updates`' page as `EventsStream` rows grouped by token, for a
        catch-up: the rows are built straight from the columns, in the
        database thread, without the JSON form and its parsing (which together
        cost as much CPU as the query)."""
        return await self._page(
            "get_events_parsed_updates",
            _PARSED_ROWS,
            instance_name,
            from_token,
            upto_token,
            target_row_count,
        )

    async def _page(
        self,
        desc: str,
        form: _RowForm,
        instance_name: str,
        from_token: Token,
        upto_token: Token,
        target_row_count: int,
    ) -> tuple[list[Any], Token, bool]:
        """One page of `get_updates` in `form`."""
        if from_token >= upto_token:
            return [], upto_token, False

        def read(cursor: Cursor) -> tuple[list[Any], Token, bool]:
            event_rows, ex_outlier_rows, state_rows, upper, limited = _read_page(
                cursor, instance_name, from_token, upto_token, target_row_count
            )
            if not ex_outlier_rows and not state_rows:
                return form.events_page(event_rows), upper, limited
            updates = _merge_updates(
                (row for row in event_rows if row[0] <= upper),
                ex_outlier_rows,
                state_rows,
                form,
            )
            return form.finish(updates), upper, limited

        return await self._db.run_interaction(desc, read)

    async def get_all_rows(self, instance_name: str) -> list[StreamUpdate]:
        """Every row `instance_name` wrote up to the current token, through
        `get_updates` (paging while limited)."""
        updates: list[StreamUpdate] = []
        token = 0
        current = self.current_token(instance_name)
        while True:
            page, token, limited = await self.get_updates(
                instance_name, token, current, 10_000
            )
            updates.extend(page)
            if not limited:
                return updates

    async def get_all_rows_unpaged(self, instance_name: str) -> list[StreamUpdate]:
        """Every row `instance_name` wrote up to the current token, by plain
        queries without limits and sorted here: an oracle for `get_updates`'
        paging that shares only the row shapes with it."""
        upto = self.current_token(instance_name)
        args = (0, upto, instance_name)

        def read(cursor: Cursor) -> list[StreamUpdate]:
            cursor.execute(_NEW_EVENTS_SQL, args)
            events = cursor.fetchall()
            cursor.execute(_EX_OUTLIERS_SQL, args)
            ex_outliers = cursor.fetchall()
            cursor.execute(_STATE_DELTAS_SQL, args)
            deltas = cursor.fetchall()
            return _sorted_updates(events + ex_outliers, deltas)

        return await self._db.run_interaction("get_all_events_rows", read)

    async def get_current_state(self, room_id: str) -> dict[StateKey, str]:
        """The room's current state: (type, state_key) -> event id."""
        rows = await self._db.execute(
            "get_current_state",
            "SELECT type, state_key, event_id FROM current_state_events"
            " WHERE room_id = ?",
            room_id,
        )
        return {(row[0], row[1]): row[2] for row in rows}


def _read_page(
    cursor: Cursor,
    instance_name: str,
    from_token: Token,
    upto_token: Token,
    target_row_count: int,
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]], int, bool]:
    """The rows of one page of `get_updates`, per source:
    ``(event_rows, ex_outlier_rows, state_rows, upper, limited)``.

    The target is shared between new events and state changes (Synapse
    expects about as many of each); the ex-outliers, always few, are not
    limited. Whichever source hits its limit first lowers the upper token for
    the others, so every source is complete up to `upper`; `event_rows` may
    go past it (filter them) only when `state_rows` is not empty.
    """
    per_source = max(1, target_row_count // 2)

    def fetch(sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        cursor.execute(sql, args)
        return cursor.fetchall()

    event_rows = fetch(
        _NEW_EVENTS_SQL + " LIMIT ?", (from_token, upto_token, instance_name, per_source)
    )
    # `stream_ordering` is the primary key of `events` and the joined tables
    # add no rows, so each token has at most one ``ev`` row and a full page
    # may end at its last row's token.
    if len(event_rows) >= per_source:
        limited = True
        upper = int(event_rows[-1][0])
    else:
        limited = False
        upper = upto_token

    # No state rows means `upper` is unchanged.
    state_rows, upper, state_limited = page_whole_tokens(
        lambda low, high, limit: fetch(
            _STATE_DELTAS_SQL + " LIMIT ?", (low, high, instance_name, limit)
        ),
        lambda token: fetch(_STATE_DELTAS_AT_SQL, (token, instance_name)),
        from_token,
        upper,
        per_source,
    )
    ex_outlier_rows = fetch(_EX_OUTLIERS_SQL, (from_token, upper, instance_name))
    return event_rows, ex_outlier_rows, state_rows, upper, limited or state_limited


def _merge_updates(
    event_rows: Iterable[tuple[Any, ...]],
    ex_outlier_rows: Iterable[tuple[Any, ...]],
    state_rows: Iterable[tuple[Any, ...]],
    form: _RowForm,
) -> list[tuple[Token, Any]]:
    """The three sources, each in token order, as one list in token order.

    Within a token, ``ev`` rows come first, then ``state`` and ``state-all``
    rows (the order Synapse produces).
    """
    ev = form.ev
    return list(
        heapq.merge(
            ((row[0], ev(row)) for row in event_rows),
            ((row[0], ev(row)) for row in ex_outlier_rows),
            _state_updates(state_rows, form),
            key=itemgetter(0),
        )
    )


def _sorted_updates(
    ev_rows: list[tuple[Any, ...]], delta_rows: list[tuple[Any, ...]]
) -> list[StreamUpdate]:
    """All rows sorted by (token, kind, room, type, state_key), computed
    without `_state_updates` or the merge, for `get_all_rows_unpaged`."""
    keyed: list[tuple[tuple[Any, ...], StreamUpdate]] = []
    for row in ev_rows:
        keyed.append(((row[0], 0), (row[0], ["ev", list(row[1:])])))
    counts: dict[tuple[int, str], int] = {}
    for row in delta_rows:
        counts[(row[0], row[1])] = counts.get((row[0], row[1]), 0) + 1
    for (token, room_id), count in counts.items():
        if count >= MAX_STATE_UPDATES_PER_ROOM:
            keyed.append(((token, 2, room_id), (token, ["state-all", [room_id]])))
    for row in delta_rows:
        if counts[(row[0], row[1])] < MAX_STATE_UPDATES_PER_ROOM:
            update: JsonValue = ["state", list(row[1:])]
            keyed.append(((row[0], 1, row[1], row[2], row[3]), (row[0], update)))
    keyed.sort(key=lambda item: item[0])
    return [update for _, update in keyed]
