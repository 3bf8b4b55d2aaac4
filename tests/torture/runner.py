"""The randomized scenario runner shared by the torture topologies.

A `Scenario` is built from a seed: it sets up writers and readers (each
topology subclasses it), draws a schedule of steps from ``random.Random(seed)``
(writes of every kind, faults, quiet periods) and runs them one after the
other. After every quiet period and at the end it waits until nothing is in
flight and every running reader has reached every writer's position, then
checks the invariants of `tests.torture.ledger` against the database (the
oracle) and the bounds of `BoundsMonitor`.

Also here: the pieces every topology uses (probed protocol factories, an HTTP
resource that stalls requests on demand, a site that can drop its
connections, the write operations, and the check of what was logged).
"""

from __future__ import annotations

import abc
import random
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import attrs
from twisted.enterprise import adbapi
from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synapse_replication._json import decode_json
from synapse_replication.commands import Command, PositionCommand
from synapse_replication.errors import HttpCatchUpError
from synapse_replication.handler import HandlerLimits
from synapse_replication.redis import RedisReplicationClient, RedisSettings
from synapse_replication.storage import (
    Database,
    EventsStore,
    EventToPersist,
    ReceiptsStore,
    TypingWriter,
)
from synapse_replication.streams import ReceiptsStream
from synapse_replication.tcp import (
    ClientReplicationProtocol,
    ConnectionLimits,
    ReplicationClientFactory,
    ReplicationServerFactory,
    ServerReplicationProtocol,
)
from synapse_replication.testing import inject
from tests.torture.ledger import (
    TYPING,
    LedgerDataHandler,
    ReaderLedger,
    check_bounds,
    check_persisted,
    check_typing,
    typing_base,
)
from tests.torture.links import (
    BoundsMonitor,
    CutPlan,
    ProtocolProbe,
    override,
    shrink_socket_buffers,
)

REACTOR: Final[Any] = _reactor
_log: Final = Logger(namespace="tests.torture")

SECRET: Final = "torture-secret"

# Small bounds, so that the schedules reach them: a stalled reader is given
# up on after a few hundred rows, a burst of rows fills a reader's queue.
CONNECTION_LIMITS: Final = ConnectionLimits(
    max_pending_commands=200, max_pending_bytes=64 * 1024, close_timeout=0.5
)
HANDLER_LIMITS: Final = HandlerLimits(
    max_queued_commands_per_stream=400,
    max_pending_batch_rows=300,
    catch_up_row_count=37,
    catch_up_retry_initial_s=0.05,
    catch_up_retry_max_s=0.4,
)
# How long a quiet period may take to settle before the run fails.
SETTLE_TIMEOUT_S: Final = 45.0


# -- instrumented pieces


def _probe(proto: Any, monitor: BoundsMonitor) -> ProtocolProbe:
    probe = ProtocolProbe(proto, monitor)
    made = proto.connectionMade

    def connection_made() -> None:
        shrink_socket_buffers(proto.transport)
        made()

    override(proto, "connectionMade", connection_made)
    return probe


class ProbedServerFactory(ReplicationServerFactory):
    """A server factory whose protocols carry a `ProtocolProbe` and small
    socket buffers."""

    def __init__(self, *, monitor: BoundsMonitor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.monitor = monitor

    def buildProtocol(self, addr: IAddress | None) -> ServerReplicationProtocol:
        proto = super().buildProtocol(addr)
        _probe(proto, self.monitor)
        return proto


class ProbedClientFactory(ReplicationClientFactory):
    """A client factory whose protocols carry a `ProtocolProbe` (kept in
    `probes`, newest last) and small socket buffers; a cut armed while
    disconnected applies to the next connection."""

    def __init__(self, *, monitor: BoundsMonitor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.monitor = monitor
        self.probes: list[ProtocolProbe] = []
        self.next_cut: CutPlan | None = None

    def buildProtocol(self, addr: IAddress | None) -> ClientReplicationProtocol:
        proto = super().buildProtocol(addr)
        probe = _probe(proto, self.monitor)
        if self.next_cut is not None:
            probe.arm(self.next_cut)
            self.next_cut = None
        self.probes.append(probe)
        del self.probes[:-4]
        return proto


class AnnouncementWatch:
    """Watches what a writer's handler sends on its persisted streams.

    Two kinds of announcement must each never go backwards: where the writer
    says it is (``POSITION T T``, its answer to REPLICATE), across restarts
    too, or readers would take it for a restart and refetch everything; and
    what its streamer publishes (RDATA tokens, ``POSITION prev new`` with
    prev < new). Between the kinds it may: the streamer can still publish a
    range it read before a REPLICATE answer told a new connection more.
    `highest` outlives the writer's incarnations; `describe` gives the
    writer's state for the failure message.
    """

    def __init__(
        self,
        handler: Any,
        persisted: Sequence[str],
        describe: Callable[[], str],
        highest: dict[tuple[str, str], int],
        problems: list[str],
    ) -> None:
        self.problems = problems
        self._highest = highest
        self._persisted = frozenset(persisted)
        self._describe = describe
        self._send = handler.send_command
        self._name = handler.instance_name
        override(handler, "send_command", self._send_command)

    def _send_command(self, cmd: Command) -> None:
        stream = getattr(cmd, "stream_name", None)
        if stream in self._persisted and getattr(cmd, "instance_name", None) == self._name:
            if isinstance(cmd, PositionCommand):
                kind = "where" if cmd.prev_token == cmd.new_token else "streamer"
                token: int | None = cmd.new_token
            else:
                kind, token = "streamer", getattr(cmd, "token", None)
            if token is not None:
                key = (kind, stream)
                highest = self._highest.get(key)
                if highest is not None and token < highest:
                    self.problems.append(
                        f"{self._name} announced {cmd.NAME} {stream} {token} after {highest} "
                        f"({kind}): {self._describe()}"
                    )
                self._highest[key] = max(token, highest if highest is not None else token)
        self._send(cmd)


class MonitoredRedisClient(RedisReplicationClient):
    """A Redis replication client that records the high-water marks of its
    publish queue, and can say where its connections come from."""

    def __init__(self, *, monitor: BoundsMonitor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._monitor = monitor

    def publish_command(self, cmd: Command) -> None:
        super().publish_command(cmd)
        monitor = self._monitor
        monitor.max_redis_queue = max(monitor.max_redis_queue, self.queued_commands)
        monitor.max_redis_queued_bytes = max(monitor.max_redis_queued_bytes, self._queued_bytes)

    def transport_of(self, which: str) -> Any:
        """The TCP transport of the "subscriber" or "publisher" connection,
        if it is up."""
        keeper = self._subscriber if which == "subscriber" else self._publisher
        proto = keeper.ready_protocol
        return None if proto is None else proto.transport


@attrs.define
class StallControl:
    """How many of the next HTTP catch-up requests hang (never answered)."""

    stall_next: int = 0
    stalled: int = 0
    served: int = 0


class StallingResource(Resource):
    """Hands requests to `inner`, except those `control` says to hang."""

    isLeaf = True

    def __init__(self, inner: Resource, control: StallControl) -> None:
        super().__init__()
        self._inner = inner
        self._control = control

    def render(self, request: Request) -> bytes | int:
        if self._control.stall_next > 0:
            self._control.stall_next -= 1
            self._control.stalled += 1
            _log.info("stalling an HTTP catch-up request")
            return NOT_DONE_YET
        self._control.served += 1
        result: bytes | int = self._inner.render(request)
        return result


class TrackingSite(WrappingFactory, ServerFactory):
    """A site that keeps its open connections, to drop them when the
    instance serving it dies (a hung request's among them). A listener
    factory, hence `ServerFactory`; `WrappingFactory` keeps the live ones."""

    def __init__(self, resource: Resource) -> None:
        site = Site(resource)
        site.displayTracebacks = False
        super().__init__(site)

    def abort_all(self) -> None:
        # `protocols` holds the wrappers of the connections still open.
        for wrapper in list(self.protocols):
            if wrapper.transport is not None:
                wrapper.transport.abortConnection()


# -- nodes


class WriterNode(abc.ABC):
    """An instance that writes streams."""

    name: str
    running: bool = False

    @abc.abstractmethod
    async def start(self) -> None:
        """Start (again, on the same database and ports)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Die: stop listening, drop every connection, close the stores."""

    @abc.abstractmethod
    def current_token(self, stream: str) -> int:
        """This writer's published position on `stream`."""

    @abc.abstractmethod
    def busy(self) -> list[str]:
        """Why it is not idle (nothing: idle)."""


class ReaderNode(abc.ABC):
    """A reader, possibly restarted several times; `ledger` spans them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ledger = ReaderLedger(name)
        self.data: LedgerDataHandler | None = None
        self.running = False
        # Positions kept by a stopped incarnation, for the next one.
        self.saved_positions: dict[tuple[str, str], int] = {}

    def new_data_handler(self) -> LedgerDataHandler:
        self.data = LedgerDataHandler(self.ledger, self.saved_positions)
        return self.data

    def kill_data_handler(self) -> None:
        """The process dies: its positions are what it had persisted."""
        if self.data is not None:
            self.data.dead = True
            self.saved_positions = self.data.positions()

    def positions(self) -> dict[tuple[str, str], int]:
        if self.data is None or self.data.dead:
            return dict(self.saved_positions)
        return self.data.positions()

    @abc.abstractmethod
    async def start(self) -> None:
        """Start an incarnation, from the positions the last one kept."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Die: drop the connections; the positions are kept."""

    @abc.abstractmethod
    def follows(self) -> dict[str, list[str]]:
        """Stream -> the writers this reader follows on it."""

    @abc.abstractmethod
    def connected(self) -> bool:
        """Every connection it needs is up."""

    @abc.abstractmethod
    def busy(self) -> list[str]:
        """Why it is not idle (nothing: idle)."""


# -- writes


class EventWrites:
    """The write operations on one writer's events and receipts stores,
    with realistic identifiers drawn from the scenario's random source.

    Receipts always have a key of their own (a new user), because a new
    receipt replaces the previous one of its key in the store, which is
    the oracle: a replaced receipt could not be checked.
    """

    def __init__(
        self,
        rng: random.Random,
        server_name: str,
        rooms: Sequence[str],
        events: Callable[[], EventsStore],
        receipts: Callable[[], ReceiptsStore],
        prefix: str,
    ) -> None:
        self._rng = rng
        self._server = server_name
        self.rooms = list(rooms)
        self._events = events
        self._receipts = receipts
        self._prefix = prefix
        self.event_ids: list[str] = []
        self._counter = 0
        self.failed_writes = 0

    def _user(self) -> str:
        return f"@{self._rng.choice(('alice', 'bob', 'carol', 'dan', 'erin'))}:{self._server}"

    def _room(self) -> str:
        return self._rng.choice(self.rooms)

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def _message(self, room: str, body: str, **kwargs: Any) -> EventToPersist:
        return EventToPersist(
            event_id=inject.make_event_id(),
            room_id=room,
            type="m.room.message",
            sender=self._user(),
            content={"msgtype": "m.text", "body": body},
            **kwargs,
        )

    def _changes(self, count: int) -> dict[tuple[str, str], str | None]:
        n = self._next()
        return {
            ("org.example.torture", f"{self._prefix}{n}-{i}"): (
                None if self._rng.random() < 0.1 else inject.make_event_id()
            )
            for i in range(count)
        }

    async def _persist(
        self, events: list[EventToPersist], state_delta: Any = None
    ) -> None:
        await self._events().persist_events(events, state_delta)
        self.event_ids.extend(e.event_id for e in events)

    async def random_write(self) -> str:
        """One write of a kind drawn at random; what it was."""
        rng = self._rng
        kind = rng.choices(
            (
                "message",
                "bulk",
                "state",
                "member",
                "state_change",
                "huge_state",
                "receipt",
                "outlier",
                "rejected",
                "failing",
                "huge_receipt",
            ),
            weights=(30, 8, 8, 6, 6, 3, 18, 3, 2, 4, 1),
        )[0]
        room = self._room()
        if kind == "message":
            await self._persist([self._message(room, f"m{self._next()}")])
        elif kind == "bulk":
            count = rng.randint(10, 120)
            await self._persist([self._message(room, f"b{self._next()}") for _ in range(count)])
        elif kind == "state":
            event = EventToPersist(
                event_id=inject.make_event_id(),
                room_id=room,
                type="m.room.topic",
                sender=self._user(),
                state_key=rng.choice(("", "x", self._prefix)),
                content={"topic": f"t{self._next()}"},
            )
            await self._persist([event])
        elif kind == "member":
            user = self._user()
            event = EventToPersist(
                event_id=inject.make_event_id(),
                room_id=room,
                type="m.room.member",
                sender=user,
                state_key=user,
                membership=rng.choice(("join", "leave", "invite", "ban")),
            )
            await self._persist([event])
        elif kind == "state_change":
            await self._events().update_current_state(room, self._changes(rng.randint(1, 6)))
        elif kind == "huge_state":
            count = rng.choice((149, 150, 200))
            if rng.random() < 0.5:
                await self._events().update_current_state(room, self._changes(count))
            else:
                await self._persist(
                    [self._message(room, "with a delta")],
                    state_delta={room: self._changes(count)},
                )
        elif kind == "receipt":
            event_id = rng.choice(self.event_ids) if self.event_ids else "$none"
            await self._receipts().insert_receipt(
                room,
                rng.choice(("m.read", "m.read.private")),
                f"@r{self._prefix}{self._next()}:{self._server}",
                event_id,
                rng.choice((None, "main", event_id)),
                {"ts": rng.randint(1, 2**40)},
            )
        elif kind == "huge_receipt":
            # A row whose RDATA line is over the 16 KiB line limit (a client
            # may put that much in a receipt): it cannot travel as a line,
            # so readers must get it by catch-up.
            event_id = rng.choice(self.event_ids) if self.event_ids else "$none"
            await self._receipts().insert_receipt(
                room,
                "m.read",
                f"@r{self._prefix}{self._next()}:{self._server}",
                event_id,
                None,
                {"ts": 1, "padding": "x" * rng.randint(16_400, 20_000)},
            )
        elif kind == "outlier":
            await self._persist([self._message(room, "old", outlier=True)])
        elif kind == "rejected":
            event = EventToPersist(
                event_id=inject.make_event_id(),
                room_id=room,
                type="m.room.power_levels",
                sender=self._user(),
                state_key="",
                rejected=True,
            )
            await self._persist([event])
        else:
            await self.failing_write()
        return kind

    async def bulk(self, count: int) -> None:
        """`count` messages in one write."""
        room = self._room()
        await self._persist([self._message(room, f"b{self._next()}") for _ in range(count)])

    async def failing_write(self) -> None:
        """A write that rolls back: an event id that is already stored."""
        if not self.event_ids:
            return
        duplicate = EventToPersist(
            event_id=self._rng.choice(self.event_ids),
            room_id=self._room(),
            type="m.room.message",
            sender=self._user(),
        )
        try:
            await self._events().persist_events([self._message(self._room(), "ok"), duplicate])
        except Exception as e:
            _log.info("failing write failed as planned: {e}", e=e)
            self.failed_writes += 1
        else:
            raise AssertionError("a write of a duplicate event id succeeded")


class JournalTypingWriter(TypingWriter):
    """A typing writer that keeps the changes it made: (serial, room, users)."""

    def __init__(self, clock: Any, instance_name: str, notify: Callable[[], None]) -> None:
        super().__init__(clock, instance_name, notify)
        self.journal: list[tuple[int, str, tuple[str, ...]]] = []

    def _changed(self, room_id: str) -> None:
        self.journal.append(
            (self.current_token("") + 1, room_id, tuple(self._typing.get(room_id, ())))
        )
        super()._changed(room_id)


class TypingWrites:
    """Typing changes on a typing writer (found anew after each restart)."""

    def __init__(
        self, rng: random.Random, server_name: str, writer: Callable[[], TypingWriter]
    ) -> None:
        self._rng = rng
        self._server = server_name
        self._writer = writer
        self.rooms = [f"!typing{i}:{server_name}" for i in range(6)]

    def random_change(self) -> str:
        rng = self._rng
        room = rng.choice(self.rooms)
        user = f"@{rng.choice(('alice', 'bob', 'carol', 'dan'))}:{self._server}"
        if rng.random() < 0.65:
            self._writer().started_typing(room, user, rng.choice((2_000, 30_000, 600_000)))
            return "typing start"
        self._writer().stopped_typing(room, user)
        return "typing stop"


async def run_concurrently(work: Sequence[Callable[[], Awaitable[object]]]) -> list[Any]:
    """Run `work` at once; the results, or the failures, in order."""
    deferreds: list[Deferred[Any]] = []
    for item in work:

        async def one(item: Callable[[], Awaitable[object]] = item) -> object:
            return await item()

        deferreds.append(Deferred.fromCoroutine(one()))
    results: list[Any] = []
    for d in deferreds:
        try:
            results.append(await d)
        except Exception as e:
            results.append(Failure(e))
    return results


async def receipts_rows(
    db: Database, writer: str, after: int, upto: int
) -> list[tuple[int, Any]]:
    """The receipts oracle: the table read directly, typed."""
    rows = await db.execute(
        "torture_receipts_oracle",
        "SELECT stream_id, room_id, receipt_type, user_id, event_id, thread_id, data"
        " FROM receipts_linearized WHERE instance_name = ? AND ? < stream_id"
        " AND stream_id <= ? ORDER BY stream_id",
        writer,
        after,
        upto,
    )
    return [
        (int(r[0]), ReceiptsStream.parse_row([r[1], r[2], r[3], r[4], r[5], decode_json(r[6])]))
        for r in rows
    ]


# -- the scenario


@attrs.frozen
class Step:
    """One step of a schedule: a kind and its arguments."""

    kind: str
    args: tuple[Any, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind}{self.args if self.args else ''}"


class Scenario(abc.ABC):
    """One randomized run of a topology. Subclasses build the instances
    (`setup`, `teardown`), draw the schedule (`make_schedule`), run a step
    (`execute`) and name the oracle (`store_rows`, `typing_rows`)."""

    handler_limits: HandlerLimits = HANDLER_LIMITS
    connection_limits: ConnectionLimits = CONNECTION_LIMITS
    # Set by topologies that replicate through Redis: its queue's bounds.
    redis_settings: RedisSettings | None = None

    def __init__(self, case: TestCase, seed: int, steps: int) -> None:
        self.case = case
        self.seed = seed
        self.rng = random.Random(seed)
        # Separate sources, so that a change in how one is used does not
        # change the schedule.
        self.io_rng = random.Random(seed * 7 + 1)
        self.n_steps = steps
        self.monitor = BoundsMonitor()
        self.writers: dict[str, WriterNode] = {}
        self.readers: list[ReaderNode] = []
        self.done: list[str] = []
        self.checks = 0
        # What the faults did, for the log (and the soak's totals).
        self.stats: dict[str, int] = {}

    def count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n

    def effects(self) -> dict[str, int]:
        """What happened in the run: steps by kind, and what they caused."""
        effects = dict(self.stats)
        for step in self.done:
            kind = step.partition("(")[0]
            effects[f"step {kind}"] = effects.get(f"step {kind}", 0) + 1
        effects["gave up on a reader"] = self.monitor.failed_to_keep_up
        effects["connections cut"] = self.monitor.cuts
        effects["connections cut mid-batch"] = self.monitor.batch_cuts
        effects["protocols built"] = self.monitor.protocols
        for reason, n in self.monitor.closes.items():
            effects[f"closed: {reason}"] = n
        effects["resets"] = sum(
            len(v) for r in self.readers for v in r.ledger.resets.values()
        )
        effects["rows delivered"] = sum(
            len(d.rows) for r in self.readers for d in r.ledger.deliveries
        )
        return effects

    # To be provided by a topology

    @abc.abstractmethod
    async def setup(self) -> None: ...

    @abc.abstractmethod
    async def teardown(self) -> None: ...

    @abc.abstractmethod
    def make_schedule(self) -> list[Step]: ...

    @abc.abstractmethod
    async def execute(self, step: Step) -> None: ...

    @abc.abstractmethod
    async def store_rows(
        self, stream: str, writer: str, after: int, upto: int
    ) -> list[tuple[int, Any]]:
        """The store's rows of `writer` in ``(after, upto]``, typed."""

    @abc.abstractmethod
    def typing_rows(self, writer: str, after: int) -> dict[str, tuple[str, ...]]:
        """The room lists of the typing writer's rooms changed after `after`
        (read at once: see `typing_expectation`)."""

    def extra_pending(self) -> list[str]:
        return []

    def typing_history(self, writer: str) -> str:
        """The typing writer's recent changes, for failure messages."""
        return "(not recorded)"

    def bounds_problems(self) -> list[str]:
        settings = self.redis_settings
        return check_bounds(
            self.monitor,
            max_pending_commands=self.connection_limits.max_pending_commands,
            max_pending_bytes=self.connection_limits.max_pending_bytes,
            handler_limits=self.handler_limits,
            max_redis_commands=None if settings is None else settings.max_queued_commands,
            max_redis_bytes=None if settings is None else settings.max_queued_bytes,
        )

    # Running

    async def run(self) -> None:
        inject.seed(self.seed)
        await self.setup()
        try:
            schedule = self.make_schedule()
            for index, step in enumerate(schedule):
                self.done.append(str(step))
                started = REACTOR.seconds()
                try:
                    await self.execute(step)
                    self.count(f"seconds in {step.kind}", round(REACTOR.seconds() - started))
                except Exception as e:
                    recent = "; ".join(self.done[-6:])
                    raise AssertionError(
                        f"at step {index + 1}/{len(schedule)} {step} (recent: {recent}): {e}"
                    ) from e
            await self.settle_and_check("the end")
        finally:
            await self.teardown()
        _log.info(
            "torture seed {seed}: {steps} steps, {checks} checks, bounds {bounds}, "
            "effects {effects}",
            seed=self.seed,
            steps=len(self.done),
            checks=self.checks,
            bounds=self.monitor,
            effects=sorted(self.effects().items()),
        )

    def pending(self) -> list[str]:
        pending: list[str] = []
        for writer in self.writers.values():
            if writer.running:
                pending += writer.busy()
        for reader in self.readers:
            if not reader.running:
                continue
            if not reader.connected():
                pending.append(f"{reader.name} not connected")
                continue
            pending += reader.busy()
            positions = reader.positions()
            for stream, writer_names in reader.follows().items():
                for name in writer_names:
                    writer = self.writers[name]
                    if not writer.running:
                        continue
                    token = writer.current_token(stream)
                    position = positions.get((stream, name))
                    if position != token:
                        pending.append(
                            f"{reader.name} at {position} on {stream}/{name}, not {token}"
                        )
        return pending + self.extra_pending()

    async def settle(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Wait until nothing is pending (three checks in a row). Returns
        right after the last check, so that a caller that goes on without
        waiting sees the quiet state (a typing timeout may fire at the next
        turn of the reactor)."""
        deadline = REACTOR.seconds() + timeout
        quiet = 0
        while True:
            await deferLater(REACTOR, 0.01, lambda: None)
            pending = self.pending()
            if not pending:
                quiet += 1
                if quiet >= 3:
                    return
                continue
            quiet = 0
            if REACTOR.seconds() > deadline:
                raise AssertionError(f"not quiet after {timeout} s: {', '.join(pending[:8])}")

    async def settle_and_check(self, when: str) -> None:
        await self.settle()
        await self.check(when)

    async def check(self, when: str) -> None:
        """Every invariant, at a quiet moment.

        Everything that can change without a step is read at once, before
        the first wait: positions, and typing (users time out by the clock).
        """
        self.checks += 1
        problems: list[str] = []
        persisted: list[tuple[ReaderNode, str, str, int | None]] = []
        for reader in self.readers:
            positions = reader.positions()
            for stream, writer_names in reader.follows().items():
                for name in writer_names:
                    position = positions.get((stream, name))
                    if stream != TYPING:
                        persisted.append((reader, stream, name, position))
                    elif reader.running and position is not None:
                        expected = self.typing_rows(name, typing_base(reader.ledger, name))
                        found = check_typing(reader.ledger, name, expected)
                        if found:
                            found.append(f"writer's typing changes: {self.typing_history(name)}")
                        problems += found
        for reader, stream, name, position in persisted:
            start = reader.ledger.starts.get((stream, name))
            if position is not None and start is None:
                problems.append(f"{reader.name}: {stream}/{name} has no start")
                continue
            expected_rows = (
                []
                if position is None or start is None
                else await self.store_rows(stream, name, start, position)
            )
            problems += check_persisted(reader.ledger, stream, name, position, expected_rows)
        problems += self.bounds_problems()
        if problems:
            raise AssertionError(f"invariants broken at {when}:\n  " + "\n  ".join(problems))


def typing_expectation(typing: TypingWriter, instance: str, after: int) -> dict[str, tuple[str, ...]]:
    """The room lists of `typing`'s rooms changed after `after`, read at
    once (its update function never waits)."""
    result: list[Any] = []
    Deferred.fromCoroutine(
        typing.get_updates(instance, after, typing.current_token(instance), 10**9)
    ).addBoth(result.append)
    (answer,) = result
    if isinstance(answer, Failure):
        answer.raiseException()
    rows, _, limited = answer
    assert not limited
    return {row[0]: tuple(row[1]) for _, row in rows}


# -- what may be logged


def _is_expected(failure: Failure) -> bool:
    """Failures the faults make happen: connections lost or refused, cancelled
    requests, catch-ups that timed out, a database closed under a query by a
    restart, a PostgreSQL backend terminated."""
    value = failure.value
    if isinstance(
        value,
        ConnectionClosed | ConnectError | CancelledError | HttpCatchUpError | adbapi.ConnectionLost,
    ):
        return True
    if isinstance(value, RuntimeError) and "database is closed" in str(value):
        return True
    if isinstance(value, sqlite3.ProgrammingError) and "closed" in str(value):
        return True
    module = type(value).__module__
    return module.startswith("psycopg2")


def check_logged_errors(case: TestCase, seed: int) -> None:
    """Fail if anything but an expected failure was logged as an error."""
    failures: list[Failure] = case.flushLoggedErrors()
    unexpected = [f for f in failures if not _is_expected(f)]
    if unexpected:
        shown = "\n".join(f.getTraceback() for f in unexpected[:3])
        raise AssertionError(
            f"seed {seed}: {len(unexpected)} unexpected errors were logged:\n{shown}"
        )
