# -*- test-case-name: tests.streams.test_streams -*-
"""The `push_rules` stream: ``[user_id]`` whose push rules changed."""

from __future__ import annotations

from typing import Final

import attrs

from synapse_replication._json import JsonValue
from synapse_replication.streams._base import RowBase, Stream, check_str, row_list

NAME: Final = "push_rules"


@attrs.frozen(slots=True)
class PushRulesStreamRow(RowBase):
    user_id: str


class PushRulesStream(Stream[PushRulesStreamRow]):
    NAME = NAME
    ROW_TYPE = PushRulesStreamRow

    @classmethod
    def parse_row(cls, row: JsonValue) -> PushRulesStreamRow:
        return PushRulesStreamRow(check_str(NAME, "user_id", row_list(NAME, row, 1)[0]))

    @classmethod
    def row_to_json(cls, row: PushRulesStreamRow) -> JsonValue:
        return [row.user_id]
