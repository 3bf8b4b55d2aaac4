# -*- test-case-name: tests.streams.test_streams -*-
"""What every stream is: a name, a row type, and two functions from its source.

A stream does not know where its rows live. Whoever builds it passes in:

- `current_token_function(instance_name) -> int`: on a writer, the position up
  to which that instance's rows are committed (the id generator's token);
- `update_function(instance_name, from_token, upto_token, target_row_count)`:
  the rows that instance wrote with `from_token < token <= upto_token`, as
  ``(updates, new_upto_token, limited)``. With `limited`, only the rows up to
  `new_upto_token` were returned and the caller asks again from there.

The invariant every update function keeps: it returns *every* row in
``(from_token, new_upto_token]`` and never part of the rows of one token, so a
caller that loops while `limited` sees each row exactly once.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, ClassVar, Final, Generic, TypeVar

from synapse_replication._accel import SPEEDUPS
from synapse_replication._json import JsonValue
from synapse_replication.errors import StreamRowError

Token = int
# One update as update functions return it: the token and the row as JSON values
# (exactly what goes into RDATA and into the HTTP catch-up answer).
StreamUpdate = tuple[Token, JsonValue]
StreamUpdateResult = tuple[list[StreamUpdate], Token, bool]
UpdateFunction = Callable[[str, Token, Token, int], Awaitable[StreamUpdateResult]]
CurrentTokenFunction = Callable[[str], Token]

RowT = TypeVar("RowT")

# How many rows a streamer asks for at once; Synapse uses the same number.
DEFAULT_TARGET_ROW_COUNT: Final = 100

_NoneType: Final = type(None)


# `_speedups.build_row(new, values, spec)`, when the C module is there: the
# C twin of the inline checks at the top of the frequent streams' `parse_row`
# (see its docstring in _speedups.c for the spec characters).
C_BUILD_ROW: Final[Callable[..., Any] | None] = (
    None if SPEEDUPS is None else SPEEDUPS.build_row
)


class RowBase:
    """Base of the typed row classes (frozen attrs classes with slots).

    It holds their weak reference slot, which attrs would otherwise add to each
    class after its fields: a row class that adds nothing but its fields has the
    layout `fast_constructor` needs to build rows quickly in `parse_row`.
    """

    __slots__ = ("__weakref__",)


class Stream(abc.ABC, Generic[RowT]):
    """A named, ordered log of rows, with its source passed in.

    `last_token` is the writer side's published position: rows up to it have
    been handed to the streamer. Readers keep their own positions elsewhere
    (`ReplicationDataHandler`), because a reader's position is about what it
    has *received*, not what its store holds.
    """

    NAME: ClassVar[str]
    # The frozen attrs class (or base class) of this stream's typed rows.
    ROW_TYPE: ClassVar[type[Any]]

    def __init__(
        self,
        local_instance_name: str,
        current_token_function: CurrentTokenFunction,
        update_function: UpdateFunction,
    ) -> None:
        self.local_instance_name = local_instance_name
        self._current_token_function = current_token_function
        self.update_function = update_function
        self.last_token = current_token_function(local_instance_name)

    @classmethod
    @abc.abstractmethod
    def parse_row(cls, row: JsonValue) -> RowT:
        """The typed row for a row as received; StreamRowError if malformed."""

    @classmethod
    @abc.abstractmethod
    def row_to_json(cls, row: RowT) -> JsonValue:
        """The row as JSON values, as it goes into RDATA (inverse of parse_row)."""

    def current_token(self, instance_name: str) -> Token:
        """The writer `instance_name`'s committed position, from the source."""
        return self._current_token_function(instance_name)

    def discard_updates_and_advance(self) -> None:
        """Skip to the current position: nobody is listening for these rows."""
        self.last_token = self.current_token(self.local_instance_name)

    async def get_updates(
        self, target_row_count: int = DEFAULT_TARGET_ROW_COUNT
    ) -> StreamUpdateResult:
        """Rows this instance wrote since `last_token`, moving `last_token` on.

        Returns ``(updates, new_token, limited)``; with `limited`, call again.
        """
        current = self.current_token(self.local_instance_name)
        if current == self.last_token:
            return [], current, False
        updates, upto, limited = await self.update_function(
            self.local_instance_name, self.last_token, current, target_row_count
        )
        self.last_token = upto
        return updates, upto, limited


def group_updates_by_token(
    updates: Iterable[StreamUpdate],
) -> Iterator[tuple[Token, list[JsonValue]]]:
    """Consecutive updates that share a token, as ``(token, rows)`` groups.

    Update functions return rows in token order, so consecutive grouping is
    grouping by token.
    """
    current: Token | None = None
    rows: list[JsonValue] = []
    for token, row in updates:
        if token != current:
            if rows:
                assert current is not None
                yield current, rows
            current = token
            rows = []
        rows.append(row)
    if rows:
        assert current is not None
        yield current, rows


# Helpers for the row parsers below: small, exact, and naming what is wrong.


def row_list(stream: str, row: JsonValue, length: int) -> list[Any]:
    """`row` as a list of exactly `length` items, else StreamRowError."""
    if type(row) is not list or len(row) != length:
        raise StreamRowError(
            f"{stream} row must be a JSON list of {length} items: {str(row)[:200]}"
        )
    return row


def check_str(stream: str, what: str, value: Any) -> str:
    if type(value) is not str:
        raise StreamRowError(f"{stream} row: {what} must be a string, not {value!r:.80}")
    return value


def check_opt_str(stream: str, what: str, value: Any) -> str | None:
    if value is not None and type(value) is not str:
        raise StreamRowError(
            f"{stream} row: {what} must be a string or null, not {value!r:.80}"
        )
    return value


def check_int(stream: str, what: str, value: Any) -> int:
    if type(value) is not int:
        raise StreamRowError(f"{stream} row: {what} must be an integer, not {value!r:.80}")
    return value


def check_opt_int(stream: str, what: str, value: Any) -> int | None:
    if value is not None and type(value) is not int:
        raise StreamRowError(
            f"{stream} row: {what} must be an integer or null, not {value!r:.80}"
        )
    return value


def check_bool(stream: str, what: str, value: Any) -> bool:
    """Booleans as Synapse sends them: true/false from PostgreSQL, 1/0 from
    SQLite. Anything else is refused rather than guessed."""
    if value is True or value is False:
        return value
    if type(value) is int and (value == 0 or value == 1):
        return value == 1
    raise StreamRowError(f"{stream} row: {what} must be a boolean, not {value!r:.80}")


def check_str_list(stream: str, what: str, value: Any) -> tuple[str, ...]:
    if type(value) is not list or not all(type(v) is str for v in value):
        raise StreamRowError(
            f"{stream} row: {what} must be a list of strings, not {value!r:.80}"
        )
    return tuple(value)
