# -*- test-case-name: tests.streams.test_streams -*-
"""The `to_device` stream: ``[entity]``, a local user id or a remote server
name that has new to-device messages waiting."""

from __future__ import annotations

from typing import Final

import attrs

from synapse_replication._json import JsonValue
from synapse_replication.streams._base import RowBase, Stream, check_str, row_list

NAME: Final = "to_device"


@attrs.frozen(slots=True)
class ToDeviceStreamRow(RowBase):
    entity: str


class ToDeviceStream(Stream[ToDeviceStreamRow]):
    NAME = NAME
    ROW_TYPE = ToDeviceStreamRow

    @classmethod
    def parse_row(cls, row: JsonValue) -> ToDeviceStreamRow:
        return ToDeviceStreamRow(check_str(NAME, "entity", row_list(NAME, row, 1)[0]))

    @classmethod
    def row_to_json(cls, row: ToDeviceStreamRow) -> JsonValue:
        return [row.entity]
