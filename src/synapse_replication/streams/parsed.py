# -*- test-case-name: tests.test_handler -*-
"""Update functions that can also hand over their rows already parsed.

A catch-up turns every row an update function returns into its stream's typed
row (`Stream.parse_row`), grouped by token. A source that reads its own
database builds the JSON form of each row from columns, only for the handler
to check and take it apart again: for the ``events`` stream that round trip
cost as much CPU as the query itself. Such a source can offer both forms by
wrapping them in `UpdateFunctionWithParsed`: it is the stream's update function
(the JSON form, for RDATA and the HTTP catch-up endpoint) and the handler's
catch-up uses its `parsed` form.

The contract of `parsed` is that of the update function (every row of
``(from_token, new_upto_token]``, never part of a token) with the rows as
`Stream.parse_row` makes them from the JSON form, already grouped: one
``(token, rows)`` pair per token, in token order, each with at least one row.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import attrs
from twisted.logger import Logger

from synapse_replication.errors import ReplicationError
from synapse_replication.streams._base import (
    Stream,
    StreamUpdate,
    StreamUpdateResult,
    Token,
    UpdateFunction,
    group_updates_by_token,
)

_log: Final = Logger(namespace="synapse_replication.handler")

# The rows of one token, parsed.
ParsedGroup = tuple[Token, list[Any]]
# ``(groups, new_upto_token, limited)``, like `StreamUpdateResult`.
ParsedUpdateResult = tuple[list[ParsedGroup], Token, bool]
ParsedUpdateFunction = Callable[[str, Token, Token, int], Awaitable[ParsedUpdateResult]]


@attrs.frozen
class UpdateFunctionWithParsed:
    """An update function (calling it gives the JSON form) whose rows are
    also available parsed, from `parsed`, for a catch-up."""

    update: UpdateFunction
    parsed: ParsedUpdateFunction

    def __call__(
        self, instance_name: str, from_token: Token, upto_token: Token, target_row_count: int
    ) -> Awaitable[StreamUpdateResult]:
        return self.update(instance_name, from_token, upto_token, target_row_count)


def parse_updates(
    stream: Stream[Any] | type[Stream[Any]], updates: Iterable[StreamUpdate]
) -> list[ParsedGroup]:
    """`updates` in JSON form (in token order) parsed by `stream`, grouped by
    token. A malformed row is logged and dropped; a token left without rows
    has no group."""
    groups: list[ParsedGroup] = []
    parse = stream.parse_row
    for token, raw_rows in group_updates_by_token(updates):
        rows = []
        for raw in raw_rows:
            try:
                rows.append(parse(raw))
            except ReplicationError as e:
                _log.error(
                    "Dropping malformed row of stream {stream!r} in catch-up: {e}",
                    stream=stream.NAME,
                    e=e,
                )
        if rows:
            groups.append((token, rows))
    return groups
