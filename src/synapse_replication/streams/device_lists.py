# -*- test-case-name: tests.streams.test_streams -*-
"""The `device_lists` stream: ``[user_id, is_signature, hosts_calculated]``."""

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

NAME: Final = "device_lists"


@attrs.frozen(slots=True)
class DeviceListsStreamRow(RowBase):
    user_id: str
    is_signature: bool
    hosts_calculated: bool


class DeviceListsStream(Stream[DeviceListsStreamRow]):
    NAME = NAME
    ROW_TYPE = DeviceListsStreamRow

    @classmethod
    def parse_row(cls, row: JsonValue) -> DeviceListsStreamRow:
        f = row_list(NAME, row, 3)
        return DeviceListsStreamRow(
            check_str(NAME, "user_id", f[0]),
            check_bool(NAME, "is_signature", f[1]),
            check_bool(NAME, "hosts_calculated", f[2]),
        )

    @classmethod
    def row_to_json(cls, row: DeviceListsStreamRow) -> JsonValue:
        return [row.user_id, row.is_signature, row.hosts_calculated]
