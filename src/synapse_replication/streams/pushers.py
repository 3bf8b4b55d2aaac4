# -*- test-case-name: tests.streams.test_streams -*-
"""The `pushers` stream: ``[user_id, app_id, pushkey, deleted]``."""

from __future__ import annotations

from typing import Final

import attrs

from synapse_replication._json import JsonValue
from synapse_replication.streams._base import (
    RowBase,
    Stream,
    check_bool,
    check_str,
    row_list,
)

NAME: Final = "pushers"


@attrs.frozen(slots=True)
class PushersStreamRow(RowBase):
    user_id: str
    app_id: str
    pushkey: str
    deleted: bool


class PushersStream(Stream[PushersStreamRow]):
    NAME = NAME
    ROW_TYPE = PushersStreamRow

    @classmethod
    def parse_row(cls, row: JsonValue) -> PushersStreamRow:
        f = row_list(NAME, row, 4)
        return PushersStreamRow(
            check_str(NAME, "user_id", f[0]),
            check_str(NAME, "app_id", f[1]),
            check_str(NAME, "pushkey", f[2]),
            check_bool(NAME, "deleted", f[3]),
        )

    @classmethod
    def row_to_json(cls, row: PushersStreamRow) -> JsonValue:
        return [row.user_id, row.app_id, row.pushkey, row.deleted]
