# -*- test-case-name: tests.test_end_to_end -*-
"""Write events, state, receipts and typing into a writer's stores the way an
application would, with realistic Matrix identifiers.

Every helper returns what it wrote (event ids, stream ids) so a test can name
the rows it expects.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Mapping
from typing import Any

from synapse_replication.storage import EventsStore, ReceiptsStore, TypingWriter
from synapse_replication.storage.events import EventToPersist

_rand = random.Random()


def seed(value: int) -> None:
    """Make the generated identifiers repeatable."""
    _rand.seed(value)


def _b64(n: int) -> str:
    raw = bytes(_rand.getrandbits(8) for _ in range(n))
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def make_event_id() -> str:
    """An event id shaped like a room v4+ one: ``$`` and 43 url-safe base64 chars."""
    return "$" + _b64(32)[:43]


def make_room_id(server_name: str = "example.com") -> str:
    return f"!{_b64(14)[:18]}:{server_name}"


async def _persist_one(store: EventsStore, **fields: Any) -> str:
    """Persist one event with a fresh id; returns the id."""
    event_id = make_event_id()
    await store.persist_events([EventToPersist(event_id=event_id, **fields)])
    return event_id


async def inject_message(
    store: EventsStore,
    room_id: str,
    sender: str,
    body: str = "hello",
    *,
    relates_to: str | None = None,
    outlier: bool = False,
) -> str:
    """A plain `m.room.message` (optionally a thread reply); returns its id."""
    return await _persist_one(
        store,
        room_id=room_id,
        type="m.room.message",
        sender=sender,
        relates_to=relates_to,
        relation_type="m.thread" if relates_to else None,
        outlier=outlier,
        content={"msgtype": "m.text", "body": body},
    )


async def inject_state(
    store: EventsStore,
    room_id: str,
    event_type: str,
    state_key: str,
    sender: str,
    content: Mapping[str, Any] | None = None,
) -> str:
    """A state event that becomes the room's current state for its key."""
    return await _persist_one(
        store,
        room_id=room_id,
        type=event_type,
        sender=sender,
        state_key=state_key,
        content=dict(content or {}),
    )


async def inject_member(
    store: EventsStore, room_id: str, user_id: str, membership: str, sender: str | None = None
) -> str:
    """An `m.room.member` event for `user_id` (join, invite, leave, ban...)."""
    return await _persist_one(
        store,
        room_id=room_id,
        type="m.room.member",
        sender=sender or user_id,
        state_key=user_id,
        membership=membership,
        content={"membership": membership},
    )


async def inject_redaction(store: EventsStore, room_id: str, sender: str, redacts: str) -> str:
    """An `m.room.redaction` of `redacts`."""
    return await _persist_one(
        store, room_id=room_id, type="m.room.redaction", sender=sender, redacts=redacts
    )


async def inject_outlier_then_de_outlier(
    store: EventsStore, room_id: str, sender: str
) -> str:
    """An event first stored as an outlier, then made a real event (which
    writes an `ex_outlier_stream` row)."""
    event_id = await inject_message(store, room_id, sender, "from the past", outlier=True)
    await store.de_outlier_events([event_id])
    return event_id


async def inject_state_change(
    store: EventsStore, room_id: str, changes: Mapping[tuple[str, str], str | None]
) -> int | None:
    """Change many keys of a room's current state at one stream id, without a
    new event (what state resolution does); returns that stream id."""
    return await store.update_current_state(room_id, changes)


async def inject_receipt(
    store: ReceiptsStore,
    room_id: str,
    user_id: str,
    event_id: str,
    *,
    receipt_type: str = "m.read",
    thread_id: str | None = None,
    ts: int = 1_700_000_000_000,
) -> int:
    """A read receipt (unthreaded, ``"main"`` or in a thread); returns its stream id."""
    return await store.insert_receipt(
        room_id, receipt_type, user_id, event_id, thread_id, {"ts": ts}
    )


def inject_typing(
    writer: TypingWriter, room_id: str, user_id: str, typing: bool = True, timeout_ms: int = 30_000
) -> None:
    """`user_id` starts (or stops) typing in `room_id`."""
    if typing:
        writer.started_typing(room_id, user_id, timeout_ms)
    else:
        writer.stopped_typing(room_id, user_id)
