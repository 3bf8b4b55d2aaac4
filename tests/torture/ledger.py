"""What each reader received, across its restarts, and the invariants on it.

A reader process that restarts keeps its positions (as if it had persisted
them) but is a new object: `LedgerDataHandler` is one incarnation, and every
incarnation of a reader writes into the same `ReaderLedger`. A stopped
incarnation is *dead*: whatever its old handler still delivers (a catch-up
that was in flight) is ignored, as it would be in a process that died.

The invariants (`check_persisted`, `check_typing`), for each reader and each
(stream, writer):

- persisted streams: the rows received, in arrival order, are exactly the
  store's rows with a token in ``(start, position]`` (typed with the
  stream's `parse_row`), where `start` is the reader's first position: none
  missing, none duplicated; tokens strictly increase (so one token's rows
  arrive in one call, in order); the stream is never reset;
- typing: tokens strictly increase since the last reset, and the room lists
  the reader built from its rows are the writer's;
- a reader that is running and quiet is at every writer's position.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import attrs

from synapse_replication.commands import PositionCommand, RdataCommand
from synapse_replication.data_handler import PositionKey
from synapse_replication.handler import HandlerLimits, ReplicationCommandHandler
from synapse_replication.interfaces import IReplicationConnection
from synapse_replication.streams.typing import TypingStreamRow
from synapse_replication.testing import TestReplicationDataHandler
from tests.torture.links import BoundsMonitor

TYPING = "typing"


@attrs.frozen
class Delivery:
    """One `on_rdata` call of a reader."""

    stream: str
    instance: str
    token: int
    rows: tuple[Any, ...]
    incarnation: int


@attrs.define
class ReaderLedger:
    """Everything one reader delivered, over all its incarnations."""

    name: str
    deliveries: list[Delivery] = attrs.Factory(list)
    # (stream, instance) -> index in `deliveries` where the latest reset was.
    resets: dict[PositionKey, list[int]] = attrs.Factory(dict)
    # (stream, instance) -> the first position the reader ever had.
    starts: dict[PositionKey, int] = attrs.Factory(dict)
    incarnations: int = 0
    # Everything that happened to each key, in order, for failure messages:
    # ("rdata"|"position"|"reset", token, incarnation).
    journal: dict[PositionKey, list[tuple[str, int, int]]] = attrs.Factory(dict)

    def note(self, key: PositionKey, what: str, token: int, incarnation: int) -> None:
        self.journal.setdefault(key, []).append((what, token, incarnation))

    def since_reset(self, key: PositionKey) -> list[Delivery]:
        resets = self.resets.get(key)
        start = resets[-1] if resets else 0
        return [d for d in self.deliveries[start:] if (d.stream, d.instance) == key]


class LedgerDataHandler(TestReplicationDataHandler):
    """One incarnation of a reader's data handler, writing into its ledger."""

    __test__ = False

    def __init__(
        self, ledger: ReaderLedger, initial_positions: Mapping[PositionKey, int] | None = None
    ) -> None:
        super().__init__(initial_positions)
        ledger.incarnations += 1
        self.ledger = ledger
        self.incarnation = ledger.incarnations
        self.dead = False

    def process_rows(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> None:
        super().process_rows(stream_name, instance_name, token, rows)
        self.ledger.deliveries.append(
            Delivery(stream_name, instance_name, token, tuple(rows), self.incarnation)
        )
        self.ledger.note((stream_name, instance_name), "rdata", token, self.incarnation)

    def on_rdata(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> Awaitable[None] | None:
        if self.dead:
            return None
        return super().on_rdata(stream_name, instance_name, token, rows)

    def on_position(self, stream_name: str, instance_name: str, token: int) -> None:
        if self.dead:
            return
        key = (stream_name, instance_name)
        if self.get_position(stream_name, instance_name) is None:
            self.ledger.starts.setdefault(key, token)
        self.ledger.note(key, "position", token, self.incarnation)
        super().on_position(stream_name, instance_name, token)

    def on_stream_reset(self, stream_name: str, instance_name: str, token: int) -> None:
        if self.dead:
            return
        key = (stream_name, instance_name)
        self.ledger.resets.setdefault(key, []).append(len(self.ledger.deliveries))
        self.ledger.note(key, "reset", token, self.incarnation)
        super().on_stream_reset(stream_name, instance_name, token)


class MonitoredHandler(ReplicationCommandHandler):
    """A command handler that records the high-water marks of its per-stream
    queues and pending batches after every command it is given."""

    def __init__(self, *, monitor: BoundsMonitor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._monitor = monitor

    def on_rdata(self, connection: IReplicationConnection, cmd: RdataCommand) -> None:
        super().on_rdata(connection, cmd)
        self._sample()

    def on_position(self, connection: IReplicationConnection, cmd: PositionCommand) -> None:
        super().on_position(connection, cmd)
        self._sample()

    def _sample(self) -> None:
        monitor = self._monitor
        queued = max((len(q) for q in self._queues.values()), default=0)
        monitor.max_handler_queue = max(monitor.max_handler_queue, queued)
        batch = max(
            (len(b) for s in self._state.values() for b in s.pending_batches.values()),
            default=0,
        )
        monitor.max_pending_batch = max(monitor.max_pending_batch, batch)


def _increasing(deliveries: Sequence[Delivery]) -> str | None:
    """None, or what is wrong with the order of `deliveries`' tokens."""
    previous: int | None = None
    for d in deliveries:
        if previous is not None and d.token <= previous:
            return f"token {d.token} after {previous} (incarnation {d.incarnation})"
        previous = d.token
    return None


def check_persisted(
    ledger: ReaderLedger,
    stream: str,
    writer: str,
    position: int | None,
    expected: list[tuple[int, Any]],
) -> list[str]:
    """The problems with what `ledger` holds of (`stream`, `writer`), given
    the store's rows in ``(start, position]`` (`expected`)."""
    key = (stream, writer)
    problems = []
    if ledger.resets.get(key):
        problems.append(f"{ledger.name}: {stream}/{writer} was reset {ledger.resets[key]}")
    deliveries = [d for d in ledger.deliveries if (d.stream, d.instance) == key]
    if position is None:
        if deliveries:
            problems.append(f"{ledger.name}: {stream}/{writer} rows without a position")
        return problems
    order = _increasing(deliveries)
    if order is not None:
        problems.append(f"{ledger.name}: {stream}/{writer} out of order: {order}")
    got = [(d.token, row) for d in deliveries for row in d.rows]
    if got != expected:
        problems.append(
            f"{ledger.name}: {stream}/{writer} rows differ from the store's in "
            f"({ledger.starts.get(key)}, {position}]: {describe_difference(got, expected)}"
        )
    return problems


def typing_state(ledger: ReaderLedger, writer: str) -> dict[str, tuple[str, ...]]:
    """The room lists a reader built from its typing rows since the last reset."""
    state: dict[str, tuple[str, ...]] = {}
    for d in ledger.since_reset((TYPING, writer)):
        for row in d.rows:
            assert isinstance(row, TypingStreamRow)
            state[row.room_id] = row.user_ids
    return state


def typing_base(ledger: ReaderLedger, writer: str) -> int:
    """Where the reader's view of the typing stream starts: 0 after a reset
    (it refetched everything), else its first position."""
    key = (TYPING, writer)
    if ledger.resets.get(key):
        return 0
    return ledger.starts.get(key, 0)


def check_typing(
    ledger: ReaderLedger, writer: str, expected: Mapping[str, tuple[str, ...]]
) -> list[str]:
    """The problems with a reader's typing state, given the writer's rooms
    that changed since `typing_base` (`expected`)."""
    problems = []
    order = _increasing(ledger.since_reset((TYPING, writer)))
    if order is not None:
        problems.append(f"{ledger.name}: typing/{writer} out of order: {order}")
    state = typing_state(ledger, writer)
    if state != dict(expected):
        rooms = sorted(
            room for room in set(state) | set(expected) if state.get(room) != expected.get(room)
        )
        history = [
            (d.token, d.incarnation, [(r.room_id, r.user_ids) for r in d.rows if r.room_id in rooms])
            for d in ledger.deliveries
            if (d.stream, d.instance) == (TYPING, writer)
        ]
        problems.append(
            f"{ledger.name}: typing/{writer} state differs from the writer's in {rooms}: "
            f"reader {[(r, state.get(r)) for r in rooms]} writer "
            f"{[(r, expected.get(r)) for r in rooms]}; resets at {ledger.resets.get((TYPING, writer))}; "
            f"typing deliveries (token, incarnation, rows of those rooms): {history[-12:]}; "
            f"journal {ledger.journal.get((TYPING, writer), [])[-30:]}"
        )
    return problems


def check_bounds(
    monitor: BoundsMonitor,
    *,
    max_pending_commands: int,
    max_pending_bytes: int,
    handler_limits: HandlerLimits,
    max_redis_commands: int | None = None,
    max_redis_bytes: int | None = None,
) -> list[str]:
    """The high-water marks that went past their bounds."""
    checks = [
        ("send queue commands", monitor.max_pending_commands, max_pending_commands),
        ("send queue bytes", monitor.max_pending_bytes, max_pending_bytes),
        ("handler queue", monitor.max_handler_queue, handler_limits.max_queued_commands_per_stream),
        ("pending batch rows", monitor.max_pending_batch, handler_limits.max_pending_batch_rows),
    ]
    if max_redis_commands is not None:
        checks.append(("redis queue commands", monitor.max_redis_queue, max_redis_commands))
    if max_redis_bytes is not None:
        checks.append(("redis queue bytes", monitor.max_redis_queued_bytes, max_redis_bytes))
    return [f"{name}: {value} > {bound}" for name, value, bound in checks if value > bound]


def describe_difference(got: list[tuple[int, Any]], expected: list[tuple[int, Any]]) -> str:
    """A short account of how two row lists differ."""
    got_tokens = [t for t, _ in got]
    expected_tokens = [t for t, _ in expected]
    missing = sorted(set(expected_tokens) - set(got_tokens))
    extra = sorted(set(got_tokens) - set(expected_tokens))
    duplicated = sorted({t for t in got_tokens if got_tokens.count(t) > expected_tokens.count(t)})
    first = next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
        min(len(got), len(expected)),
    )
    around = got[first : first + 1], expected[first : first + 1]
    return (
        f"{len(got)} rows vs {len(expected)}; missing tokens {missing[:10]}, "
        f"extra {extra[:10]}, duplicated {duplicated[:10]}; first difference at "
        f"#{first}: got {around[0]!r:.300} expected {around[1]!r:.300}"
    )
