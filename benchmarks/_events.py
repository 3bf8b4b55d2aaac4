"""The events that pipeline.py and redis_path.py persist.

This module imports `synapse_replication`: pipeline_receivers.py and
_harness.py must not import it (see _harness.py).
"""

from __future__ import annotations

import base64
import random
from typing import Final

from synapse_replication.storage.events import EventToPersist

SEED: Final = 20251127


class EventSource:
    """Deterministic ``m.room.message`` events: 1000 rooms, 5000 senders, one
    in 20 a thread reply (its row then carries ``relates_to``). The same seed
    gives the same events, hence the same RDATA bytes, whether they are asked
    for at once or in consecutive batches."""

    def __init__(self, seed: int = SEED) -> None:
        self._rng = random.Random(seed)
        self._rooms = [f"!{self._b64(14)[:18]}:example.com" for _ in range(1000)]
        self._users = [f"@user{i}:example.com" for i in range(5000)]
        self._recent: list[str] = []

    def _b64(self, n: int) -> str:
        return base64.urlsafe_b64encode(self._rng.randbytes(n)).decode("ascii")

    def batch(self, start: int, count: int) -> list[EventToPersist]:
        """Events `start` to ``start + count - 1``; `start` must be where the
        previous batch ended (0 at first)."""
        rng = self._rng
        events = []
        for i in range(start, start + count):
            event_id = "$" + self._b64(32)[:43]
            thread_root = rng.choice(self._recent) if self._recent and i % 20 == 0 else None
            events.append(
                EventToPersist(
                    event_id=event_id,
                    room_id=rng.choice(self._rooms),
                    type="m.room.message",
                    sender=rng.choice(self._users),
                    relates_to=thread_root,
                    relation_type="m.thread" if thread_root else None,
                    origin_server_ts=1_700_000_000_000 + i,
                    depth=i + 1,
                    content={"msgtype": "m.text", "body": f"message {i}"},
                )
            )
            if i % 100 == 0:
                self._recent = [*self._recent[-99:], event_id]
        return events
