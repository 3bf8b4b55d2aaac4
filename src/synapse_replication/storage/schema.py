# -*- test-case-name: tests.storage.test_schema -*-
"""The database schema: created on first open, versioned, upgraded in order.

Tables and columns carry Synapse's names for the same data (a subset of its
columns), so the stream queries read the same against a Synapse database.

`schema_version` holds one row: the version the database is at. `UPGRADES[i]`
takes a database from version ``i`` to ``i + 1``; a new database is version 0
and goes through all of them. Invariant: a database is only ever used at
exactly `SCHEMA_VERSION`; one from a newer library is refused, never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from synapse_replication.errors import ReplicationError
from synapse_replication.storage.database import Cursor

# Statements taking the database up one version. `{bigint_primary_key}` is
# replaced by the engine's type for a 64-bit integer primary key.
UpgradeStep = Sequence[str]

_V1: Final[UpgradeStep] = (
    # Events, one row per event; `stream_ordering` is the events stream token.
    """
    CREATE TABLE events (
        stream_ordering {bigint_primary_key},
        topological_ordering BIGINT NOT NULL,
        event_id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        room_id TEXT NOT NULL,
        sender TEXT NOT NULL,
        state_key TEXT,
        origin_server_ts BIGINT NOT NULL,
        instance_name TEXT NOT NULL,
        outlier BOOLEAN NOT NULL
    )
    """,
    "CREATE INDEX events_room_stream ON events (room_id, stream_ordering)",
    """
    CREATE TABLE event_json (
        event_id TEXT NOT NULL UNIQUE,
        room_id TEXT NOT NULL,
        json TEXT NOT NULL
    )
    """,
    # The tables below hold at most one row per event: the `ev` row query
    # joins them to `events` and relies on that for one row per token.
    """
    CREATE TABLE state_events (
        event_id TEXT NOT NULL UNIQUE,
        room_id TEXT NOT NULL,
        type TEXT NOT NULL,
        state_key TEXT NOT NULL,
        prev_state TEXT
    )
    """,
    """
    CREATE TABLE redactions (
        event_id TEXT NOT NULL UNIQUE,
        redacts TEXT NOT NULL
    )
    """,
    "CREATE INDEX redactions_redacts ON redactions (redacts)",
    """
    CREATE TABLE event_relations (
        event_id TEXT NOT NULL UNIQUE,
        relates_to_id TEXT NOT NULL,
        relation_type TEXT NOT NULL
    )
    """,
    "CREATE INDEX event_relations_relates ON event_relations (relates_to_id)",
    """
    CREATE TABLE room_memberships (
        event_id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        sender TEXT NOT NULL,
        room_id TEXT NOT NULL,
        membership TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE rejections (
        event_id TEXT NOT NULL UNIQUE,
        reason TEXT NOT NULL
    )
    """,
    # The current state of each room, one row per state key.
    """
    CREATE TABLE current_state_events (
        event_id TEXT NOT NULL UNIQUE,
        room_id TEXT NOT NULL,
        type TEXT NOT NULL,
        state_key TEXT NOT NULL,
        membership TEXT,
        UNIQUE (room_id, type, state_key)
    )
    """,
    # Changes to current state, at events stream tokens (`event_id` NULL: the
    # key was removed). Several rows may share a `stream_id`.
    """
    CREATE TABLE current_state_delta_stream (
        stream_id BIGINT NOT NULL,
        instance_name TEXT NOT NULL,
        room_id TEXT NOT NULL,
        type TEXT NOT NULL,
        state_key TEXT NOT NULL,
        event_id TEXT,
        prev_event_id TEXT
    )
    """,
    "CREATE INDEX current_state_delta_stream_idx"
    " ON current_state_delta_stream (stream_id)",
    # Outliers that became real events, at a new events stream token each.
    """
    CREATE TABLE ex_outlier_stream (
        event_stream_ordering BIGINT PRIMARY KEY,
        event_id TEXT NOT NULL,
        state_group BIGINT,
        instance_name TEXT NOT NULL
    )
    """,
    # The latest receipt of each (room, type, user, thread). thread_id NULL is
    # the unthreaded receipt; NULLs are distinct in a unique index, so the
    # unthreaded and threaded receipts each get a partial unique index.
    """
    CREATE TABLE receipts_linearized (
        stream_id BIGINT NOT NULL,
        instance_name TEXT NOT NULL,
        room_id TEXT NOT NULL,
        receipt_type TEXT NOT NULL,
        user_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        thread_id TEXT,
        data TEXT NOT NULL
    )
    """,
    "CREATE UNIQUE INDEX receipts_linearized_unique_index"
    " ON receipts_linearized (room_id, receipt_type, user_id)"
    " WHERE thread_id IS NULL",
    "CREATE UNIQUE INDEX receipts_linearized_unique_thread_index"
    " ON receipts_linearized (room_id, receipt_type, user_id, thread_id)"
    " WHERE thread_id IS NOT NULL",
    "CREATE INDEX receipts_linearized_id ON receipts_linearized (stream_id)",
    # Each writer's persisted position, per stream (for multi-writer streams).
    """
    CREATE TABLE stream_positions (
        stream_name TEXT NOT NULL,
        instance_name TEXT NOT NULL,
        stream_id BIGINT NOT NULL,
        UNIQUE (stream_name, instance_name)
    )
    """,
)

UPGRADES: Final[Sequence[UpgradeStep]] = (_V1,)
SCHEMA_VERSION: Final = len(UPGRADES)

_CREATE_SCHEMA_VERSION: Final = """
    CREATE TABLE schema_version (
        lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE CHECK (lock = 'X'),
        version INTEGER NOT NULL
    )
"""


class SchemaVersionError(ReplicationError):
    """The database was written by a newer version of this library (or is not
    one of its databases); using it could corrupt it."""


def get_schema_version(cursor: Cursor) -> int | None:
    """The database's schema version, None if it has no schema yet."""
    cursor.execute(cursor.engine.table_exists_sql, ("schema_version",))
    if cursor.fetchone() is None:
        return None
    cursor.execute("SELECT version FROM schema_version")
    row = cursor.fetchone()
    if row is None:
        return None
    version: int = row[0]
    return version


def prepare_schema(cursor: Cursor, upgrades: Sequence[UpgradeStep] = UPGRADES) -> int:
    """Bring the database to the latest version in `upgrades`; that version.

    Runs in the caller's transaction, so a failed upgrade leaves the database
    as it was. Raises SchemaVersionError if the database is newer.
    """
    latest = len(upgrades)
    current = get_schema_version(cursor)
    if current is None:
        cursor.execute(cursor.engine.table_exists_sql, ("schema_version",))
        if cursor.fetchone() is None:
            cursor.execute(_CREATE_SCHEMA_VERSION)
        cursor.execute("INSERT INTO schema_version (version) VALUES (0)")
        current = 0
    if current > latest:
        raise SchemaVersionError(
            f"database schema version {current} is newer than this version of "
            f"synapse-replication supports ({latest}): upgrade synapse-replication, "
            "or check that this is a synapse-replication database"
        )
    params = {"bigint_primary_key": cursor.engine.bigint_primary_key}
    for step in upgrades[current:]:
        for statement in step:
            cursor.execute(statement.format_map(params))
    if current != latest:
        cursor.execute("UPDATE schema_version SET version = ?", (latest,))
    return latest
