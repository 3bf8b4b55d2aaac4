# -*- test-case-name: tests.storage.test_postgres -*-
"""PostgreSQL through psycopg2: the `Engine`, the schema's extras, and the
stores of one writer instance when several instances write the same streams.

Everything else is shared with SQLite: the same `Database` class, the same
schema (`schema.py`; only the 64-bit primary key type differs) and the same
stores. PostgreSQL adds what several writers need:

- one sequence per multi-writer stream (`events_stream_seq`,
  `receipts_sequence`, Synapse's names), from which every writer takes ids;
- `MultiWriterIdGenerator` (see `multi_writer`), which keeps each writer's
  position in `stream_positions`.

Connection arguments are psycopg2's keyword arguments (``host``, ``port``,
``dbname``, ``user``, ``password``, ...). Booleans come back as ``True`` and
``False``, which is what Synapse's PostgreSQL writers put in stream rows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final, cast

from twisted.internet.interfaces import IReactorCore, IReactorTime

from synapse_replication.storage import Stores
from synapse_replication.storage.database import Cursor, Database, Engine
from synapse_replication.storage.events import (
    EVENTS_ID_TABLES,
    EVENTS_STREAM_NAME,
    EventsStore,
)
from synapse_replication.storage.id_generators import (
    AbstractStreamIdGenerator,
    StreamIdGenerator,
)
from synapse_replication.storage.multi_writer import MultiWriterIdGenerator
from synapse_replication.storage.receipts import (
    RECEIPTS_ID_TABLES,
    RECEIPTS_STREAM_NAME,
    ReceiptsStore,
)
from synapse_replication.storage.schema import prepare_schema

# The sequences of the multi-writer streams (Synapse's names for them).
EVENTS_SEQUENCE: Final = "events_stream_seq"
RECEIPTS_SEQUENCE: Final = "receipts_sequence"

# Held for the length of the schema transaction, so that instances starting
# together do not create the same tables at once (an arbitrary constant).
_SCHEMA_LOCK_KEY: Final = 0x5E_7A_5E_12


def _on_connect(conn: Any) -> None:
    # Explicit, so that a server configured otherwise does not change the
    # isolation the stores were written for.
    conn.set_session(isolation_level="READ COMMITTED", autocommit=False)


def postgres_engine(conn_args: Mapping[str, Any]) -> Engine:
    """PostgreSQL through psycopg2, connected with `conn_args`.

    psycopg2 opens a transaction at the first statement of an interaction
    (so there is no `begin_sql`) and takes ``%s`` placeholders.
    """
    return Engine(
        name="psycopg2",
        dbapi_module="psycopg2",
        connect_kwargs=dict(conn_args),
        on_connect=_on_connect,
        placeholder="%s",
        begin_sql=None,
        table_exists_sql=(
            "SELECT 1 FROM pg_catalog.pg_tables"
            " WHERE schemaname = current_schema() AND tablename = ?"
        ),
        bigint_primary_key="BIGINT PRIMARY KEY",
    )


def prepare_postgres_schema(cursor: Cursor) -> int:
    """`prepare_schema`, then the multi-writer streams' sequences; the schema
    version.

    Serialized between instances by a transaction-scoped advisory lock: the
    second instance waits, then finds the schema in place. The sequences are
    created with PostgreSQL's default ``CACHE 1``, which `MultiWriterIdGenerator`
    relies on (every `nextval` is above every value handed out before it).
    """
    cursor.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK_KEY,))
    version = prepare_schema(cursor)
    for sequence in (EVENTS_SEQUENCE, RECEIPTS_SEQUENCE):
        cursor.execute(f"CREATE SEQUENCE IF NOT EXISTS {sequence}")
    return version


async def open_postgres_stores(
    conn_args: Mapping[str, Any],
    instance_name: str,
    reactor: IReactorCore,
    notify: Callable[[], None],
    *,
    events_writers: Collection[str],
    receipts_writers: Collection[str],
    pool_size: int = 5,
    persist_interval_s: float = 0.5,
) -> Stores:
    """The stores of `instance_name` in the PostgreSQL database `conn_args`.

    `events_writers` and `receipts_writers` name every instance that writes
    each stream (this one need not be among them: a reader only reads). A
    stream with one writer gets a `StreamIdGenerator`, as on SQLite; one with
    several gets a `MultiWriterIdGenerator` on the stream's sequence, whose
    jumps forward are persisted at most every `persist_interval_s`.

    `notify` is poked after each committed write and whenever a stream's
    position advances through one; it must be cheap. `reactor` runs the pool
    and the generators' timers.
    """
    db = Database.postgres(conn_args, reactor, pool_size)
    # Every real reactor provides both.
    clock = cast(IReactorTime, reactor)
    try:
        await db.run_interaction("prepare_schema", prepare_postgres_schema)
        events_id_gen = await _make_id_gen(
            db,
            clock,
            instance_name,
            notify,
            stream_name=EVENTS_STREAM_NAME,
            sequence_name=EVENTS_SEQUENCE,
            tables=EVENTS_ID_TABLES,
            writers=events_writers,
            persist_interval_s=persist_interval_s,
        )
        receipts_id_gen = await _make_id_gen(
            db,
            clock,
            instance_name,
            notify,
            stream_name=RECEIPTS_STREAM_NAME,
            sequence_name=RECEIPTS_SEQUENCE,
            tables=RECEIPTS_ID_TABLES,
            writers=receipts_writers,
            persist_interval_s=persist_interval_s,
        )
    except BaseException:
        db.close()
        raise
    return Stores(
        db=db,
        events=EventsStore(db, events_id_gen, instance_name, notify),
        receipts=ReceiptsStore(db, receipts_id_gen, instance_name, notify),
        events_id_gen=events_id_gen,
        receipts_id_gen=receipts_id_gen,
    )


async def _make_id_gen(
    db: Database,
    clock: IReactorTime,
    instance_name: str,
    notify: Callable[[], None],
    *,
    stream_name: str,
    sequence_name: str,
    tables: Sequence[tuple[str, str]],
    writers: Collection[str],
    persist_interval_s: float,
) -> AbstractStreamIdGenerator:
    if not writers:
        raise ValueError(f"stream {stream_name!r} needs at least one writer")
    if len(writers) == 1 and instance_name in writers:
        return await StreamIdGenerator.create(
            db, instance_name, tables, stream_name=stream_name, on_advanced=notify
        )
    return await MultiWriterIdGenerator.create(
        db,
        clock,
        instance_name=instance_name,
        stream_name=stream_name,
        sequence_name=sequence_name,
        tables=tables,
        writers=writers,
        on_advanced=notify,
        persist_interval_s=persist_interval_s,
    )
