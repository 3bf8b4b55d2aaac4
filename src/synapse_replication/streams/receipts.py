# -*- test-case-name: tests.streams.test_streams -*-
"""The `receipts` stream: read receipts, persisted, with several writers.

A row is ``[room_id, receipt_type, user_id, event_id, thread_id, data]``;
`thread_id` is null (unthreaded), ``"main"`` or a thread root's event id.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from synapse_replication._fastattrs import fast_constructor
from synapse_replication._json import JsonValue
from synapse_replication.errors import StreamRowError
from synapse_replication.streams._base import (
    C_BUILD_ROW,
    RowBase,
    Stream,
    check_opt_str,
    check_str,
    row_list,
)

NAME: Final = "receipts"


@attrs.frozen(slots=True)
class ReceiptsStreamRow(RowBase):
    room_id: str
    receipt_type: str
    user_id: str
    event_id: str
    thread_id: str | None
    data: dict[str, Any]


def _parse_checked(row: JsonValue) -> ReceiptsStreamRow:
    """`parse_row`, one check at a time, naming what is wrong."""
    f = row_list(NAME, row, 6)
    data = f[5]
    if type(data) is not dict:
        raise StreamRowError(f"receipts row: data must be an object, not {data!r:.80}")
    return ReceiptsStreamRow(
        check_str(NAME, "room_id", f[0]),
        check_str(NAME, "receipt_type", f[1]),
        check_str(NAME, "user_id", f[2]),
        check_str(NAME, "event_id", f[3]),
        check_opt_str(NAME, "thread_id", f[4]),
        data,
    )


_c_build_row = C_BUILD_ROW
_new_row: Final = fast_constructor(ReceiptsStreamRow)


class ReceiptsStream(Stream[ReceiptsStreamRow]):
    NAME = NAME
    ROW_TYPE = ReceiptsStreamRow

    @classmethod
    def parse_row(cls, row: JsonValue) -> ReceiptsStreamRow:
        if _c_build_row is not None:
            built: ReceiptsStreamRow | None = _c_build_row(_new_row, row, b"ssssod")
            if built is not None:
                return built
        elif type(row) is list and len(row) == 6:
            a, b, c, d, e, data = row
            if (
                type(a) is str
                and type(b) is str
                and type(c) is str
                and type(d) is str
                and (e is None or type(e) is str)
                and type(data) is dict
            ):
                return _new_row(a, b, c, d, e, data)
        return _parse_checked(row)

    @classmethod
    def row_to_json(cls, row: ReceiptsStreamRow) -> JsonValue:
        return [
            row.room_id,
            row.receipt_type,
            row.user_id,
            row.event_id,
            row.thread_id,
            row.data,
        ]
