"""Shared helpers for the storage tests: stores on real SQLite files, events."""

from __future__ import annotations

from typing import Any, Final, cast

from twisted.internet import reactor as _global_reactor
from twisted.internet.interfaces import IReactorCore
from twisted.trial.unittest import SynchronousTestCase

from synapse_replication.storage import (
    Database,
    EventToPersist,
    Stores,
    open_sqlite_store,
    open_stores,
)

REACTOR: Final = cast(IReactorCore, _global_reactor)
ROOM: Final = "!room:test.local"
ALICE: Final = "@alice:test.local"


class Pokes:
    """A `notify` callable that counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


async def open_test_stores(
    case: SynchronousTestCase, path: str | None = None, instance_name: str = "master"
) -> tuple[Stores, Pokes]:
    """Stores on a SQLite file (a new one unless `path`), closed after the test."""
    pokes = Pokes()
    stores = await open_sqlite_store(
        path or case.mktemp(), instance_name, REACTOR, pokes
    )
    case.addCleanup(stores.close)
    return stores, pokes


async def open_inline_stores(
    path: str = ":memory:", instance_name: str = "master"
) -> tuple[Stores, Pokes]:
    """Stores whose transactions run synchronously: for tests that cannot let
    the reactor run (hypothesis examples). The caller closes them."""
    pokes = Pokes()
    stores = await open_stores(Database.sqlite_inline(path), instance_name, pokes)
    return stores, pokes


def message(event_id: str, room_id: str = ROOM, **kwargs: Any) -> EventToPersist:
    """A non-state event."""
    return EventToPersist(
        event_id=event_id,
        room_id=room_id,
        type="m.room.message",
        sender=ALICE,
        content={"body": event_id},
        **kwargs,
    )


def state(
    event_id: str,
    event_type: str,
    state_key: str,
    room_id: str = ROOM,
    **kwargs: Any,
) -> EventToPersist:
    """A state event."""
    return EventToPersist(
        event_id=event_id,
        room_id=room_id,
        type=event_type,
        state_key=state_key,
        sender=ALICE,
        **kwargs,
    )
