# -*- test-case-name: tests.streams.test_streams -*-
"""The `events` stream: new events, current-state changes and ex-outliers.

Three sources share one token (the event's `stream_ordering`), so one token may
carry an `ev` row and several `state` rows. On the wire a row is
``[type_id, [fields...]]``:

- ``["ev", [event_id, room_id, type, state_key, redacts, relates_to,
  membership, rejected, outlier]]``
- ``["state", [room_id, type, state_key, event_id]]`` (event_id null: the state
  key was removed)
- ``["state-all", [room_id]]``: too many state keys changed at once; the reader
  must treat the room's whole current state as changed.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

import attrs

from synapse_replication._fastattrs import fast_constructor
from synapse_replication._json import JsonValue
from synapse_replication.errors import StreamRowError
from synapse_replication.streams._base import (
    C_BUILD_ROW,
    RowBase,
    Stream,
    check_bool,
    check_opt_str,
    check_str,
    row_list,
)

NAME: Final = "events"


@attrs.frozen(slots=True)
class EventsStreamRow(RowBase):
    """Base of the three kinds of `events` rows; `TYPE_ID` names the kind."""

    TYPE_ID: ClassVar[str]


@attrs.frozen(slots=True)
class EventsStreamEventRow(EventsStreamRow):
    """A new event (or an outlier that became a real event)."""

    TYPE_ID = "ev"

    event_id: str
    room_id: str
    type: str
    state_key: str | None
    redacts: str | None
    relates_to: str | None
    membership: str | None
    rejected: bool
    outlier: bool


@attrs.frozen(slots=True)
class EventsStreamCurrentStateRow(EventsStreamRow):
    """One key of a room's current state changed (event_id None: removed)."""

    TYPE_ID = "state"

    room_id: str
    type: str
    state_key: str
    event_id: str | None


@attrs.frozen(slots=True)
class EventsStreamAllStateRow(EventsStreamRow):
    """So many state keys of the room changed that all of it must be reloaded."""

    TYPE_ID = "state-all"

    room_id: str


def _parse_ev(data: Any) -> EventsStreamEventRow:
    f = row_list(NAME, data, 9)
    return EventsStreamEventRow(
        check_str(NAME, "event_id", f[0]),
        check_str(NAME, "room_id", f[1]),
        check_str(NAME, "type", f[2]),
        check_opt_str(NAME, "state_key", f[3]),
        check_opt_str(NAME, "redacts", f[4]),
        check_opt_str(NAME, "relates_to", f[5]),
        check_opt_str(NAME, "membership", f[6]),
        check_bool(NAME, "rejected", f[7]),
        check_bool(NAME, "outlier", f[8]),
    )


def _parse_state(data: Any) -> EventsStreamCurrentStateRow:
    f = row_list(NAME, data, 4)
    return EventsStreamCurrentStateRow(
        check_str(NAME, "room_id", f[0]),
        check_str(NAME, "type", f[1]),
        check_str(NAME, "state_key", f[2]),
        check_opt_str(NAME, "event_id", f[3]),
    )


def _parse_state_all(data: Any) -> EventsStreamAllStateRow:
    f = row_list(NAME, data, 1)
    return EventsStreamAllStateRow(check_str(NAME, "room_id", f[0]))


_c_build_row = C_BUILD_ROW
_new_ev: Final = fast_constructor(EventsStreamEventRow)
_new_state: Final = fast_constructor(EventsStreamCurrentStateRow)

_PARSERS: Final = {
    EventsStreamEventRow.TYPE_ID: _parse_ev,
    EventsStreamCurrentStateRow.TYPE_ID: _parse_state,
    EventsStreamAllStateRow.TYPE_ID: _parse_state_all,
}


def _parse_checked(row: JsonValue) -> EventsStreamRow:
    """`EventsStream.parse_row`, one check at a time, naming what is wrong."""
    pair = row_list(NAME, row, 2)
    parser = _PARSERS.get(pair[0]) if type(pair[0]) is str else None
    if parser is None:
        raise StreamRowError(f"events row has unknown type {pair[0]!r:.80}")
    return parser(pair[1])


class EventsStream(Stream[EventsStreamRow]):
    """Events as they are persisted; several writers (event persisters)."""

    NAME = NAME
    ROW_TYPE = EventsStreamRow

    @classmethod
    def parse_row(cls, row: JsonValue) -> EventsStreamRow:
        # The two frequent kinds of row are checked inline here, in one go; a
        # row that fails any check goes to the parsers above, which name the
        # problem (and accept nothing this refuses).
        if type(row) is list and len(row) == 2:
            kind, f = row
            if type(kind) is str and type(f) is list:
                n = len(f)
                if kind == "ev" and n == 9:
                    if _c_build_row is not None:
                        ev: EventsStreamRow | None = _c_build_row(_new_ev, f, b"sssoooobb")
                        if ev is not None:
                            return ev
                        return _parse_checked(row)
                    a, b, c, d, e, g, h, i, j = f
                    if (
                        type(a) is str
                        and type(b) is str
                        and type(c) is str
                        and (d is None or type(d) is str)
                        and (e is None or type(e) is str)
                        and (g is None or type(g) is str)
                        and (h is None or type(h) is str)
                        # booleans: true/false, or 1/0 from SQLite
                        and (i is False or i is True or (type(i) is int and (i == 0 or i == 1)))
                        and (j is False or j is True or (type(j) is int and (j == 0 or j == 1)))
                    ):
                        return _new_ev(a, b, c, d, e, g, h, i == 1, j == 1)
                elif kind == "state" and n == 4:
                    if _c_build_row is not None:
                        state: EventsStreamRow | None = _c_build_row(_new_state, f, b"ssso")
                        if state is not None:
                            return state
                        return _parse_checked(row)
                    a, b, c, d = f
                    if (
                        type(a) is str
                        and type(b) is str
                        and type(c) is str
                        and (d is None or type(d) is str)
                    ):
                        return _new_state(a, b, c, d)
        return _parse_checked(row)

    @classmethod
    def row_to_json(cls, row: EventsStreamRow) -> JsonValue:
        return [row.TYPE_ID, list(attrs.astuple(row, recurse=False))]
