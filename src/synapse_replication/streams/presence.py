# -*- test-case-name: tests.streams.test_streams -*-
"""The `presence` stream: ``[user_id, state, last_active_ts,
last_federation_update_ts, last_user_sync_ts, status_msg, currently_active]``."""

from __future__ import annotations

from typing import Final

import attrs

from synapse_replication._json import JsonValue
from synapse_replication.streams._base import (
    RowBase,
    Stream,
    check_bool,
    check_int,
    check_opt_str,
    check_str,
    row_list,
)

NAME: Final = "presence"


@attrs.frozen(slots=True)
class PresenceStreamRow(RowBase):
    user_id: str
    state: str
    last_active_ts: int
    last_federation_update_ts: int
    last_user_sync_ts: int
    status_msg: str | None
    currently_active: bool


class PresenceStream(Stream[PresenceStreamRow]):
    NAME = NAME
    ROW_TYPE = PresenceStreamRow

    @classmethod
    def parse_row(cls, row: JsonValue) -> PresenceStreamRow:
        f = row_list(NAME, row, 7)
        return PresenceStreamRow(
            check_str(NAME, "user_id", f[0]),
            check_str(NAME, "state", f[1]),
            check_int(NAME, "last_active_ts", f[2]),
            check_int(NAME, "last_federation_update_ts", f[3]),
            check_int(NAME, "last_user_sync_ts", f[4]),
            check_opt_str(NAME, "status_msg", f[5]),
            check_bool(NAME, "currently_active", f[6]),
        )

    @classmethod
    def row_to_json(cls, row: PresenceStreamRow) -> JsonValue:
        return list(attrs.astuple(row, recurse=False))
