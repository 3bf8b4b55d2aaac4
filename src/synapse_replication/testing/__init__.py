# -*- test-case-name: tests.test_testing -*-
"""Public helpers for testing code built on this library.

- `TestReplicationDataHandler` records every row a reader receives.
- `synapse_replication.testing.inject` writes events, state, receipts and typing
  into a store the way an application would.
- `synapse_replication.testing.harness` runs a writer and workers in one
  reactor, connected in memory or over loopback TCP, and pumps them until
  quiet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from synapse_replication.data_handler import PositionKey, ReplicationDataHandler


@attrs.frozen
class RdataCall:
    """One `on_rdata` call: the rows that arrived together under one token."""

    stream_name: str
    instance_name: str
    token: int
    rows: tuple[Any, ...]


class TestReplicationDataHandler(ReplicationDataHandler):
    """Records what a reader receives, for assertions.

    `received_rdata_rows` holds ``(stream_name, token, row)`` in arrival order;
    `rdata_calls` keeps the grouping (rows sharing a token come in one call);
    `positions_received` and `resets` record the other notifications.
    """

    # trial collects classes named Test*; this one is a helper, not a test case.
    __test__ = False

    def __init__(self, initial_positions: Mapping[PositionKey, int] | None = None) -> None:
        super().__init__(initial_positions)
        self.received_rdata_rows: list[tuple[str, int, Any]] = []
        self.rdata_calls: list[RdataCall] = []
        self.positions_received: list[tuple[str, str, int]] = []
        self.resets: list[tuple[str, str, int]] = []

    def process_rows(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> None:
        self.rdata_calls.append(RdataCall(stream_name, instance_name, token, tuple(rows)))
        for row in rows:
            self.received_rdata_rows.append((stream_name, token, row))

    def process_reset(self, stream_name: str, instance_name: str, token: int) -> None:
        self.resets.append((stream_name, instance_name, token))

    def on_position(self, stream_name: str, instance_name: str, token: int) -> None:
        self.positions_received.append((stream_name, instance_name, token))
        super().on_position(stream_name, instance_name, token)

    def rows_for(self, stream_name: str) -> list[tuple[int, Any]]:
        """``(token, row)`` received for one stream, in arrival order."""
        return [(t, r) for s, t, r in self.received_rdata_rows if s == stream_name]

    def clear(self) -> None:
        """Forget the recorded rows and notifications (positions are kept)."""
        self.received_rdata_rows.clear()
        self.rdata_calls.clear()
        self.positions_received.clear()
        self.resets.clear()
