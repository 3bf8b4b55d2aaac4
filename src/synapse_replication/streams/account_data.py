# -*- test-case-name: tests.streams.test_streams -*-
"""The `account_data` stream: ``[user_id, room_id, data_type]``; room_id is null
for global account data."""

from __future__ import annotations

from typing import Final

import attrs

from synapse_replication._json import JsonValue
from synapse_replication.streams._base import (
    RowBase,
    Stream,
    check_opt_str,
    check_str,
    row_list,
)

NAME: Final = "account_data"


@attrs.frozen(slots=True)
class AccountDataStreamRow(RowBase):
    user_id: str
    room_id: str | None
    data_type: str


class AccountDataStream(Stream[AccountDataStreamRow]):
    NAME = NAME
    ROW_TYPE = AccountDataStreamRow

    @classmethod
    def parse_row(cls, row: JsonValue) -> AccountDataStreamRow:
        f = row_list(NAME, row, 3)
        return AccountDataStreamRow(
            check_str(NAME, "user_id", f[0]),
            check_opt_str(NAME, "room_id", f[1]),
            check_str(NAME, "data_type", f[2]),
        )

    @classmethod
    def row_to_json(cls, row: AccountDataStreamRow) -> JsonValue:
        return [row.user_id, row.room_id, row.data_type]
