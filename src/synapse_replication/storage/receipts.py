# -*- test-case-name: tests.storage.test_receipts -*-
"""The receipts store: the latest receipt per (room, type, user, thread), and
the source of the `receipts` stream's rows.

A new receipt replaces the previous one of the same key and takes a new
stream id, so the stream holds only each key's latest receipt: a reader that
missed some receipts still ends with the latest of each. `thread_id` is None
for an unthreaded receipt, ``"main"`` or a thread root's event id otherwise;
the unthreaded and the ``"main"`` receipt of a user are different keys.

Invariant of `get_updates`: every row in ``(from_token, new_upto_token]``,
never part of one token's rows. It is an `UpdateFunctionWithParsed`: a
catch-up gets the page's rows already parsed, built from the columns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from twisted.logger import Logger

from synapse_replication._fastattrs import fast_constructor
from synapse_replication._json import JsonValue, decode_json, encode_json
from synapse_replication.storage._paging import page_whole_tokens
from synapse_replication.storage.database import Cursor, Database
from synapse_replication.storage.id_generators import (
    AbstractStreamIdGenerator,
    write_at_new_ids,
)
from synapse_replication.streams._base import (
    StreamUpdate,
    StreamUpdateResult,
    Token,
    UpdateFunction,
)
from synapse_replication.streams.parsed import (
    ParsedGroup,
    ParsedUpdateResult,
    UpdateFunctionWithParsed,
)
from synapse_replication.streams.receipts import ReceiptsStreamRow

_log: Final = Logger()

RECEIPTS_STREAM_NAME: Final = "receipts"

# The tables holding receipts stream ids, for `StreamIdGenerator.create`.
RECEIPTS_ID_TABLES: Final = (("receipts_linearized", "stream_id"),)

_COLUMNS: Final = "stream_id, room_id, receipt_type, user_id, event_id, thread_id, data"
_RANGE_SQL: Final = f"""
    SELECT {_COLUMNS} FROM receipts_linearized
    WHERE ? < stream_id AND stream_id <= ? AND instance_name = ?
    ORDER BY stream_id ASC
    LIMIT ?
"""
_AT_SQL: Final = f"""
    SELECT {_COLUMNS} FROM receipts_linearized
    WHERE stream_id = ? AND instance_name = ?
"""


def _update(row: tuple[Any, ...]) -> StreamUpdate:
    """``[room_id, receipt_type, user_id, event_id, thread_id, data]``."""
    return row[0], [*row[1:6], decode_json(row[6])]


def _json_updates(rows: list[tuple[Any, ...]]) -> list[StreamUpdate]:
    return [_update(row) for row in rows]


# The columns are what the row's fields hold (this store wrote them); only
# `data`, stored as JSON text, is checked once decoded, as `parse_row` would.
_new_row: Final = fast_constructor(ReceiptsStreamRow)


def _parsed_groups(rows: list[tuple[Any, ...]]) -> list[ParsedGroup]:
    """`rows` (in token order) as `ReceiptsStream` rows grouped by token: what
    `parse_updates` makes of their JSON form."""
    groups: list[ParsedGroup] = []
    current: Token | None = None
    group: list[Any] = []
    for row in rows:
        data = decode_json(row[6])
        if type(data) is not dict:
            _log.error(
                "Dropping malformed row of stream 'receipts' in catch-up: data at token "
                "{token} must be an object, not {data!r:.80}",
                token=row[0],
                data=data,
            )
            continue
        if row[0] != current:
            current = row[0]
            group = []
            groups.append((current, group))
        group.append(_new_row(row[1], row[2], row[3], row[4], row[5], data))
    return groups


class ReceiptsStore:
    """Writes receipts for one writer instance and reads them back as
    `receipts` stream rows.

    Every write is one transaction at an id from `id_gen` (the receipts
    stream's generator); `notify` is called after each committed write.
    """

    def __init__(
        self,
        db: Database,
        id_gen: AbstractStreamIdGenerator,
        instance_name: str,
        notify: Callable[[], None],
    ) -> None:
        self._db = db
        self._id_gen = id_gen
        self._instance_name = instance_name
        self._notify = notify
        # The `receipts` stream's update function, whose parsed form
        # (`get_parsed_updates`) a catch-up uses.
        self.get_updates: Final[UpdateFunction] = UpdateFunctionWithParsed(
            self._get_updates, self.get_parsed_updates
        )

    async def insert_receipt(
        self,
        room_id: str,
        receipt_type: str,
        user_id: str,
        event_id: str,
        thread_id: str | None,
        data: Mapping[str, JsonValue],
    ) -> int:
        """Store a receipt, replacing the key's previous one; its stream id."""
        data_json = encode_json(dict(data))
        instance_name = self._instance_name

        def insert(cursor: Cursor, ids: list[int]) -> int:
            if thread_id is None:
                cursor.execute(
                    "DELETE FROM receipts_linearized WHERE room_id = ?"
                    " AND receipt_type = ? AND user_id = ? AND thread_id IS NULL",
                    (room_id, receipt_type, user_id),
                )
            else:
                cursor.execute(
                    "DELETE FROM receipts_linearized WHERE room_id = ?"
                    " AND receipt_type = ? AND user_id = ? AND thread_id = ?",
                    (room_id, receipt_type, user_id, thread_id),
                )
            cursor.execute(
                "INSERT INTO receipts_linearized (stream_id, instance_name,"
                " room_id, receipt_type, user_id, event_id, thread_id, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ids[0],
                    instance_name,
                    room_id,
                    receipt_type,
                    user_id,
                    event_id,
                    thread_id,
                    data_json,
                ),
            )
            return ids[0]

        stream_id = await write_at_new_ids(
            self._db,
            self._id_gen,
            stream_name=RECEIPTS_STREAM_NAME,
            instance_name=instance_name,
            count=1,
            desc="insert_receipt",
            func=insert,
        )
        self._notify()
        return stream_id

    def current_token(self, instance_name: str) -> Token:
        """The receipts stream's current token for writer `instance_name`."""
        return self._id_gen.get_current_token_for_writer(instance_name)

    async def _get_updates(
        self,
        instance_name: str,
        from_token: Token,
        upto_token: Token,
        target_row_count: int,
    ) -> StreamUpdateResult:
        """`get_updates` in JSON form."""
        return await self._page(
            "get_receipts_updates",
            _json_updates,
            instance_name,
            from_token,
            upto_token,
            target_row_count,
        )

    async def get_parsed_updates(
        self,
        instance_name: str,
        from_token: Token,
        upto_token: Token,
        target_row_count: int,
    ) -> ParsedUpdateResult:
        """`get_updates`' page as `ReceiptsStream` rows grouped by token, for a
        catch-up: built from the columns in the database thread, without the
        JSON form and its parsing."""
        return await self._page(
            "get_receipts_parsed_updates",
            _parsed_groups,
            instance_name,
            from_token,
            upto_token,
            target_row_count,
        )

    async def _page(
        self,
        desc: str,
        form: Callable[[list[tuple[Any, ...]]], list[Any]],
        instance_name: str,
        from_token: Token,
        upto_token: Token,
        target_row_count: int,
    ) -> tuple[list[Any], Token, bool]:
        """One page of `get_updates`, whole tokens only, its rows made by `form`."""
        if from_token >= upto_token:
            return [], upto_token, False

        def read(cursor: Cursor) -> tuple[list[Any], Token, bool]:
            def fetch_range(low: int, high: int, limit: int) -> list[tuple[Any, ...]]:
                cursor.execute(_RANGE_SQL, (low, high, instance_name, limit))
                return cursor.fetchall()

            def fetch_token(token: int) -> list[tuple[Any, ...]]:
                cursor.execute(_AT_SQL, (token, instance_name))
                return cursor.fetchall()

            rows, upper, limited = page_whole_tokens(
                fetch_range, fetch_token, from_token, upto_token, target_row_count
            )
            return form(rows), upper, limited

        return await self._db.run_interaction(desc, read)

    async def get_receipt(
        self, room_id: str, receipt_type: str, user_id: str, thread_id: str | None
    ) -> tuple[int, str, dict[str, JsonValue]] | None:
        """The key's latest receipt as (stream_id, event_id, data), or None."""
        args: tuple[str, ...]
        if thread_id is None:
            where, args = "thread_id IS NULL", (room_id, receipt_type, user_id)
        else:
            where, args = "thread_id = ?", (room_id, receipt_type, user_id, thread_id)
        rows = await self._db.execute(
            "get_receipt",
            "SELECT stream_id, event_id, data FROM receipts_linearized"
            " WHERE room_id = ? AND receipt_type = ? AND user_id = ? AND " + where,
            *args,
        )
        if not rows:
            return None
        stream_id, event_id, data = rows[0]
        return stream_id, event_id, decode_json(data)

