# -*- test-case-name: tests.storage.test_open -*-
"""Storage: the sources of the persisted streams and their id generators.

`open_sqlite_store` opens (creating and upgrading as needed) one SQLite file
holding the `events` and `receipts` streams of one writer instance. The
`typing` stream lives in memory: see `TypingWriter`. `open_postgres_stores`
(in `storage.postgres`) opens the same stores on PostgreSQL, where several
instances may write one stream (`MultiWriterIdGenerator`).

Each stream has one id generator. The events stream's covers every table whose
ids are events stream tokens: `events.stream_ordering`,
`current_state_delta_stream.stream_id` and
`ex_outlier_stream.event_stream_ordering` are one token space.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IReactorCore

from synapse_replication.storage.database import Cursor, Database, Engine
from synapse_replication.storage.events import (
    EVENTS_ID_TABLES,
    EVENTS_STREAM_NAME,
    MAX_STATE_UPDATES_PER_ROOM,
    EventsStore,
    EventToPersist,
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
from synapse_replication.storage.schema import (
    SCHEMA_VERSION,
    SchemaVersionError,
    prepare_schema,
)
from synapse_replication.storage.typing import TypingWriter


@attrs.frozen
class Stores:
    """The persisted streams of one writer instance, over one database."""

    db: Database
    events: EventsStore
    receipts: ReceiptsStore
    events_id_gen: AbstractStreamIdGenerator
    receipts_id_gen: AbstractStreamIdGenerator

    def close(self) -> None:
        """Close the database (waits for a transaction in progress), after
        stopping the multi-writer generators' timers."""
        for id_gen in (self.events_id_gen, self.receipts_id_gen):
            if isinstance(id_gen, MultiWriterIdGenerator):
                id_gen.stop()
        self.db.close()


async def open_sqlite_store(
    path: str,
    instance_name: str,
    reactor: IReactorCore,
    notify: Callable[[], None],
) -> Stores:
    """The stores of writer `instance_name` in the SQLite file `path`.

    `notify` is poked when a stream may have moved: after each committed
    write and whenever a stream's current token advances (also past a failed
    write); it must be cheap. `reactor` runs the database pool (it must also
    provide `IReactorFromThreads`, as every real reactor does).
    Raises SchemaVersionError for a database of a newer version.
    """
    return await open_stores(Database.sqlite(path, reactor), instance_name, notify)


async def open_stores(
    db: Database, instance_name: str, notify: Callable[[], None]
) -> Stores:
    """The stores of writer `instance_name` in `db`, whose schema is created or
    upgraded first. `db` is closed if this fails."""
    try:
        await db.run_interaction("prepare_schema", prepare_schema)
        events_id_gen = await StreamIdGenerator.create(
            db,
            instance_name,
            EVENTS_ID_TABLES,
            stream_name=EVENTS_STREAM_NAME,
            on_advanced=notify,
        )
        receipts_id_gen = await StreamIdGenerator.create(
            db,
            instance_name,
            RECEIPTS_ID_TABLES,
            stream_name=RECEIPTS_STREAM_NAME,
            on_advanced=notify,
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


__all__ = [
    "MAX_STATE_UPDATES_PER_ROOM",
    "SCHEMA_VERSION",
    "AbstractStreamIdGenerator",
    "Cursor",
    "Database",
    "Engine",
    "EventToPersist",
    "EventsStore",
    "MultiWriterIdGenerator",
    "ReceiptsStore",
    "SchemaVersionError",
    "Stores",
    "StreamIdGenerator",
    "TypingWriter",
    "open_sqlite_store",
    "open_stores",
]
