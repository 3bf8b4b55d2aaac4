# -*- test-case-name: tests.streams.test_streams -*-
"""The `typing` stream: who is typing in a room, held in the writer's memory.

A row is ``[room_id, [user_id, ...]]``: the room's whole list, replacing the
previous one. Only one instance writes it, and it keeps no history: a reader
that missed rows asks the writer itself (over HTTP) for the rooms that changed.
"""

from __future__ import annotations

from typing import Final

import attrs

from synapse_replication._fastattrs import fast_constructor
from synapse_replication._json import JsonValue
from synapse_replication.streams._base import (
    C_BUILD_ROW,
    RowBase,
    Stream,
    check_str,
    check_str_list,
    row_list,
)

NAME: Final = "typing"


@attrs.frozen(slots=True)
class TypingStreamRow(RowBase):
    room_id: str
    user_ids: tuple[str, ...]


def _parse_checked(row: JsonValue) -> TypingStreamRow:
    """`parse_row`, one check at a time, naming what is wrong."""
    f = row_list(NAME, row, 2)
    return TypingStreamRow(
        check_str(NAME, "room_id", f[0]), check_str_list(NAME, "user_ids", f[1])
    )


_c_build_row = C_BUILD_ROW
_new_row: Final = fast_constructor(TypingStreamRow)


class TypingStream(Stream[TypingStreamRow]):
    NAME = NAME
    ROW_TYPE = TypingStreamRow

    @classmethod
    def parse_row(cls, row: JsonValue) -> TypingStreamRow:
        if _c_build_row is not None:
            built: TypingStreamRow | None = _c_build_row(_new_row, row, b"sL")
            if built is not None:
                return built
        elif type(row) is list and len(row) == 2:
            room_id, user_ids = row
            if type(room_id) is str and type(user_ids) is list:
                for user_id in user_ids:
                    if type(user_id) is not str:
                        break
                else:
                    return _new_row(room_id, tuple(user_ids))
        return _parse_checked(row)

    @classmethod
    def row_to_json(cls, row: TypingStreamRow) -> JsonValue:
        return [row.room_id, list(row.user_ids)]
