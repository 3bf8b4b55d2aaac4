"""A cluster around one SQLite writer of `events`, `receipts` and `typing`,
for topologies (a) (readers over loopback TCP and in memory) and (b)
(readers through a real Redis).

Each reader catches up the persisted streams from the writer's file (opened
read-only, as a worker process would) and the typing stream over HTTP from
the writer. The faults: connections cut after N bytes or in the middle of a
batch (over Redis: connections killed), readers that stop reading until the
writer gives up on them (over Redis: until Redis drops them, past its
output buffer limit), writer and reader restarts, writes that roll back,
HTTP catch-up requests that hang until the client times out, a clock
(keepalive, typing expiry, retries, the HTTP client's deadlines) that jumps
forward, and Redis restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from synapse_replication.data_handler import ReplicationDataHandler
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.http import (
    HttpReplicationClient,
    InstanceLocation,
    ReplicationHttpResource,
    listen_http,
)
from synapse_replication.instance import WRITER_STREAMS, Notifier, reader_streams
from synapse_replication.storage import (
    Database,
    EventsStore,
    ReceiptsStore,
    Stores,
    StreamIdGenerator,
    TypingWriter,
    open_sqlite_store,
)
from synapse_replication.streamer import ReplicationStreamer
from synapse_replication.streams import (
    EventsStream,
    ReceiptsStream,
    Stream,
    TypingStream,
)
from synapse_replication.tcp import (
    Backoff,
    connect_replication_client,
    listen_replication,
)
from tests.redis_server import RedisServer
from tests.torture.ledger import MonitoredHandler
from tests.torture.links import (
    CutPlan,
    JumpingClock,
    MemoryLink,
    ProtocolProbe,
)
from tests.torture.redis_faults import (
    configure_redis,
    cut_subscriber,
    kill_connection,
    redis_busy,
    redis_connected,
    restart_redis,
    stall_subscriber,
    start_client,
    torture_settings,
)
from tests.torture.runner import (
    REACTOR,
    SECRET,
    AnnouncementWatch,
    EventWrites,
    JournalTypingWriter,
    MonitoredRedisClient,
    ProbedClientFactory,
    ProbedServerFactory,
    ReaderNode,
    Scenario,
    StallControl,
    StallingResource,
    Step,
    TrackingSite,
    TypingWrites,
    WriterNode,
    receipts_rows,
    run_concurrently,
    typing_expectation,
)

_log: Final = Logger(namespace="tests.torture")

WRITER: Final = "master"
SERVER: Final = "torture.local"
EVENTS: Final = EventsStream.NAME
RECEIPTS: Final = ReceiptsStream.NAME
TYPING: Final = TypingStream.NAME

Transport = Literal["tcp", "memory", "redis"]


class SqliteWriter(WriterNode):
    """The writer: store, typing, streamer, TCP listener and HTTP endpoint,
    restartable on the same file and ports."""

    def __init__(self, scenario: SqliteScenario, db_path: str) -> None:
        self.name = WRITER
        self._scenario = scenario
        self.db_path = db_path
        self.tcp_port = 0
        self.http_port = 0
        self.stores: Stores | None = None
        self.typing: JournalTypingWriter | None = None
        self.streams: dict[str, Stream[Any]] = {}
        self.handler: ReplicationCommandHandler | None = None
        self.streamer: ReplicationStreamer | None = None
        self.factory: ProbedServerFactory | None = None
        self._port: IListeningPort | None = None
        self._http: IListeningPort | None = None
        self._site: TrackingSite | None = None
        self.redis: MonitoredRedisClient | None = None
        # What it announced, across its restarts (see AnnouncementWatch).
        self.announced: dict[tuple[str, str], int] = {}
        self.announcement_problems: list[str] = []

    async def start(self) -> None:
        scenario = self._scenario
        clock = scenario.clock
        notifier = Notifier()
        self.stores = stores = await open_sqlite_store(self.db_path, WRITER, REACTOR, notifier.poke)
        self.typing = typing = JournalTypingWriter(clock, WRITER, notifier.poke)
        self.streams = {
            EVENTS: EventsStream(WRITER, stores.events.current_token, stores.events.get_updates),
            RECEIPTS: ReceiptsStream(
                WRITER, stores.receipts.current_token, stores.receipts.get_updates
            ),
            TYPING: TypingStream(WRITER, typing.current_token, typing.get_updates),
        }
        self.handler = ReplicationCommandHandler(
            instance_name=WRITER,
            clock=clock,
            streams=self.streams,
            data_handler=ReplicationDataHandler(),
            writer_streams=WRITER_STREAMS,
            stream_writers={name: [WRITER] for name in WRITER_STREAMS},
        )
        self.streamer = ReplicationStreamer(
            clock=clock, command_handler=self.handler, streams=list(self.streams.values())
        )
        notifier.add(self.streamer.on_notifier_poke)
        AnnouncementWatch(
            self.handler,
            (EVENTS, RECEIPTS),
            lambda: f"tokens {[(s, self.current_token(s)) for s in self.streams]}",
            self.announced,
            self.announcement_problems,
        )
        self.factory = ProbedServerFactory(
            monitor=scenario.monitor,
            clock=clock,
            handler=self.handler,
            server_name=SERVER,
            limits=scenario.connection_limits,
        )
        self._port = listen_replication(REACTOR, self.tcp_port, self.factory)
        self.tcp_port = self._port.getHost().port  # type: ignore[attr-defined]  # an IPv4Address here
        resource = ReplicationHttpResource(
            instance_name=WRITER,
            streams={TYPING: self.streams[TYPING]},
            secret=SECRET,
            clock=clock,
        )
        self._site = TrackingSite(StallingResource(resource, scenario.stall))
        self._http = listen_http(REACTOR, self.http_port, self._site)
        self.http_port = self._http.getHost().port  # type: ignore[attr-defined]  # an IPv4Address here
        if scenario.redis_settings is not None:
            self.redis = start_client(scenario, self.handler, SERVER, WRITER)
        self.running = True

    async def stop(self) -> None:
        """Die: stop listening, drop every connection, close the store."""
        self.running = False
        for port in (self._port, self._http):
            if port is not None:
                stopped = port.stopListening()
                if stopped is not None:
                    await stopped
        self._port = self._http = None
        assert self.factory is not None and self._site is not None
        for proto in list(self.factory.connections):
            if proto.transport is not None:
                proto.transport.abortConnection()  # type: ignore[attr-defined]  # a TCP transport here
        self._site.abort_all()
        if self.redis is not None:
            await self.redis.stop()
            self.redis = None
        assert self.typing is not None and self.streamer is not None and self.stores is not None
        self.typing.stop()
        await self.streamer.wait_until_idle()
        self.stores.close()

    def current_token(self, stream: str) -> int:
        return self.streams[stream].current_token(WRITER)

    def busy(self) -> list[str]:
        assert self.streamer is not None and self.handler is not None
        busy = []
        if not self.streamer.is_idle():
            busy.append("writer streamer busy")
        if not self.handler.is_idle():
            busy.append("writer handler busy")
        return busy + redis_busy("writer", self.redis)


class SqliteReader(ReaderNode):
    """A reader over TCP, in memory or through Redis; catches up from the
    writer's file (read-only) and, for typing, over HTTP."""

    def __init__(self, scenario: SqliteScenario, name: str, transport: Transport) -> None:
        super().__init__(name)
        self._scenario = scenario
        self.transport = transport
        self.handler: MonitoredHandler | None = None
        self.factory: ProbedClientFactory | None = None
        self._db: Database | None = None
        self._http: HttpReplicationClient | None = None
        # In memory: the live link, and when to connect again.
        self.link: MemoryLink | None = None
        self.reconnect_at: float | None = None
        self.redis: MonitoredRedisClient | None = None

    def follows(self) -> dict[str, list[str]]:
        return {name: [WRITER] for name in WRITER_STREAMS}

    async def start(self) -> None:
        scenario = self._scenario
        writer = scenario.writer
        self._db = db = Database.sqlite_reader(writer.db_path, REACTOR)
        # Only their update functions are used; their id generators are idle.
        events = EventsStore(db, StreamIdGenerator(self.name, 0), self.name, lambda: None)
        receipts = ReceiptsStore(db, StreamIdGenerator(self.name, 0), self.name, lambda: None)
        self._http = HttpReplicationClient(
            REACTOR,
            {WRITER: InstanceLocation("127.0.0.1", writer.http_port)},
            SECRET,
            clock=scenario.clock,
            timeout_s=0.4,
            retries=2,
            backoff=Backoff(initial=0.02, maximum=0.1),
            rand=scenario.io_rng.random,
            pool=HTTPConnectionPool(REACTOR, persistent=False),
        )
        sources = {
            EVENTS: events.get_updates,
            RECEIPTS: receipts.get_updates,
            TYPING: self._http.update_function(TYPING),
        }
        self.handler = MonitoredHandler(
            monitor=scenario.monitor,
            instance_name=self.name,
            clock=scenario.clock,
            streams=reader_streams(self.name, sources),
            data_handler=self.new_data_handler(),
            stream_writers={name: [WRITER] for name in WRITER_STREAMS},
            limits=scenario.handler_limits,
        )
        self.factory = ProbedClientFactory(
            monitor=scenario.monitor,
            clock=scenario.clock,
            handler=self.handler,
            server_name=SERVER,
            instance_name=self.name,
            limits=scenario.connection_limits,
            backoff=Backoff(initial=0.02, maximum=0.2),
            rand=scenario.io_rng.random,
        )
        self.running = True
        if self.transport == "tcp":
            connect_replication_client(REACTOR, "127.0.0.1", writer.tcp_port, self.factory)
        elif self.transport == "memory":
            self.reconnect_at = REACTOR.seconds()
        else:
            self.redis = start_client(scenario, self.handler, SERVER, self.name)

    async def stop(self) -> None:
        """Die: drop the connection; the positions are kept for the next start."""
        self.running = False
        self.kill_data_handler()
        assert self.factory is not None and self._http is not None and self._db is not None
        self.factory.stopTrying()
        for probe in self.factory.probes:
            transport: Any = probe.proto.transport
            if transport is not None:
                transport.abortConnection()
        if self.link is not None:
            self.link.client.abortConnection()
            self.link = None
        if self.redis is not None:
            await self.redis.stop()
            self.redis = None
        await self._http.close()
        self._db.close()

    def current_probe(self) -> ProtocolProbe | None:
        if self.factory is None or self.handler is None:
            return None
        live = self.handler.connections()
        for probe in reversed(self.factory.probes):
            if probe.proto in live:
                return probe
        return None

    def arm_cut(self, plan: CutPlan) -> None:
        probe = self.current_probe()
        if probe is not None:
            probe.arm(plan)
        elif self.factory is not None:
            self.factory.next_cut = plan

    def connected(self) -> bool:
        if self.handler is None or not self.handler.connected():
            return False
        if self.redis is not None:
            return redis_connected(self.redis)
        return self.transport == "tcp" or (self.link is not None and not self.link.closed)

    def busy(self) -> list[str]:
        if self.handler is not None and not self.handler.is_idle():
            return [f"{self.name} handler busy"]
        return []

    def pump(self) -> None:
        """In memory: move bytes, and connect again after a loss."""
        link = self.link
        if link is not None and not link.closed:
            link.pump()
            return
        now = REACTOR.seconds()
        if link is not None:
            self.link = None
            self.reconnect_at = now + self._scenario.io_rng.uniform(0.01, 0.08)
        writer = self._scenario.writer
        if self.reconnect_at is None or now < self.reconnect_at or not writer.running:
            return
        assert writer.factory is not None and self.factory is not None
        self.reconnect_at = None
        self._scenario.count("memory connections")
        server = writer.factory.buildProtocol(None)
        client = self.factory.buildProtocol(None)
        self.link = MemoryLink(server, client, self._scenario.io_rng)
        self.link.start()


class SqliteScenario(Scenario):
    """One randomized run of topology (a), or (b) with `redis`."""

    def __init__(
        self,
        case: TestCase,
        seed: int,
        steps: int,
        transports: Sequence[Transport],
        clock_jumps: bool,
        redis: RedisServer | None = None,
    ) -> None:
        super().__init__(case, seed, steps)
        self.redis_server = redis
        self.redis_settings = None if redis is None else torture_settings(redis)
        self.clock = JumpingClock(REACTOR)
        self.stall = StallControl()
        self._transports = transports
        self._clock_jumps = clock_jumps
        self.writer = SqliteWriter(self, case.mktemp() + ".db")
        self.writers[WRITER] = self.writer
        self._pump = LoopingCall(self._pump_links)
        rooms = [f"!room{i}:{SERVER}" for i in range(4)]
        self.writes = EventWrites(
            self.rng,
            SERVER,
            rooms,
            lambda: self._stores().events,
            lambda: self._stores().receipts,
            "w",
        )
        self.typing = TypingWrites(self.rng, SERVER, self._typing_writer)
        self.late: list[SqliteReader] = []

    def _stores(self) -> Stores:
        assert self.writer.stores is not None
        return self.writer.stores

    def _typing_writer(self) -> TypingWriter:
        assert self.writer.typing is not None
        return self.writer.typing

    async def setup(self) -> None:
        await self._configure_redis()
        await self.writer.start()
        count = self.rng.randint(3, 4)
        readers = []
        for i in range(count):
            transport = self.rng.choice(self._transports)
            readers.append(SqliteReader(self, f"{transport}{i + 1}", transport))
        self.readers.extend(readers)
        # The last reader may join late, mid-run.
        if self.rng.random() < 0.5:
            self.late.append(readers[-1])
        for reader in readers:
            if reader not in self.late:
                await reader.start()
        self._pump.start(0.002)
        await self.settle()

    async def _configure_redis(self) -> None:
        if self.redis_server is not None:
            await configure_redis(self.redis_server)

    async def _kill_redis_connection(self, instance: str, which: str) -> None:
        """Redis closes one connection of one instance (CLIENT KILL)."""
        assert self.redis_server is not None
        client = self.writer.redis if instance == WRITER else self._reader(instance).redis
        await kill_connection(self, self.redis_server, client, which)

    def _pump_links(self) -> None:
        for reader in self.readers:
            if isinstance(reader, SqliteReader) and reader.transport == "memory" and reader.running:
                try:
                    reader.pump()
                except Exception:
                    _log.failure("pumping {reader} failed", reader=reader.name)

    async def teardown(self) -> None:
        self.count("http requests stalled", self.stall.stalled)
        self.count("http requests served", self.stall.served)
        self.count("writes rolled back", self.writes.failed_writes)
        if self._pump.running:
            self._pump.stop()
        for reader in self.readers:
            if reader.running:
                await reader.stop()
        if self.writer.running:
            await self.writer.stop()
        self.clock.stop()
        await deferLater(REACTOR, 0.05, lambda: None)

    def typing_history(self, writer: str) -> str:
        typing = self.writer.typing
        return "(none)" if typing is None else str(typing.journal[-30:])

    def bounds_problems(self) -> list[str]:
        return self.writer.announcement_problems + super().bounds_problems()

    def extra_pending(self) -> list[str]:
        return [
            f"{r.name} link has bytes"
            for r in self.readers
            if isinstance(r, SqliteReader) and r.link is not None and r.link.buffered()
        ]

    async def store_rows(
        self, stream: str, writer: str, after: int, upto: int
    ) -> list[tuple[int, Any]]:
        stores = self._stores()
        if stream == EVENTS:
            raw = await stores.events.get_all_rows_unpaged(writer)
            return [(t, EventsStream.parse_row(r)) for t, r in raw if after < t <= upto]
        return await receipts_rows(stores.db, writer, after, upto)

    def typing_rows(self, writer: str, after: int) -> dict[str, tuple[str, ...]]:
        return typing_expectation(self._typing_writer(), writer, after)

    # The schedule

    def make_schedule(self) -> list[Step]:
        rng = self.rng
        kinds = {
            "write": 40,
            "burst": 6,
            "typing": 12,
            "quiet": 6,
            "cut": 8,
            "pause": 3,
            "restart_reader": 3,
            "restart_writer": 2,
            "stall_http": 3,
            "clock_jump": 3 if self._clock_jumps else 0,
            "redis_restart": 2 if self.redis_server is not None else 0,
            "redis_kill": 4 if self.redis_server is not None else 0,
        }
        names = list(kinds)
        weights = list(kinds.values())
        schedule: list[Step] = []
        join_at = {rng.randrange(self.n_steps): reader.name for reader in self.late}
        for index in range(self.n_steps):
            if index in join_at:
                schedule.append(Step("join", (join_at[index],)))
            kind = rng.choices(names, weights)[0]
            reader = rng.choice(self.readers).name
            if kind == "cut":
                schedule.append(
                    Step(kind, (reader, rng.choice(("bytes", "batch")), rng.randint(1, 4000)))
                )
            elif kind in ("pause", "restart_reader"):
                schedule.append(Step(kind, (reader, rng.randint(0, 4))))
            elif kind == "burst":
                schedule.append(Step(kind, (rng.randint(2, 6),)))
            elif kind == "typing":
                schedule.append(Step(kind, (rng.randint(1, 5),)))
            elif kind == "stall_http":
                schedule.append(Step(kind, (rng.randint(1, 3),)))
            elif kind == "clock_jump":
                schedule.append(Step(kind, (rng.choice((6, 30, 90, 700, 4000)),)))
            elif kind == "redis_kill":
                instance = rng.choice([WRITER, *(r.name for r in self.readers)])
                schedule.append(Step(kind, (instance, rng.choice(("subscriber", "publisher")))))
            else:
                schedule.append(Step(kind))
        for name in join_at.values():
            if not any(s.kind == "join" and s.args == (name,) for s in schedule):
                schedule.append(Step("join", (name,)))
        return schedule

    def _reader(self, name: str) -> SqliteReader:
        reader = next(r for r in self.readers if r.name == name)
        assert isinstance(reader, SqliteReader)
        return reader

    async def execute(self, step: Step) -> None:
        kind = step.kind
        if kind == "write":
            await self.writes.random_write()
        elif kind == "burst":
            results = await run_concurrently([self.writes.random_write] * step.args[0])
            for result in results:
                if not isinstance(result, str):
                    result.raiseException()
        elif kind == "typing":
            for _ in range(step.args[0]):
                self.typing.random_change()
        elif kind == "quiet":
            await self.settle_and_check("a quiet period")
        elif kind == "cut":
            name, mode, after = step.args
            reader = self._reader(name)
            if reader.running and reader.redis is not None:
                cut_subscriber(self, reader.redis)
            elif reader.running:
                reader.arm_cut(CutPlan(mode, after))
        elif kind == "pause":
            await self._pause(self._reader(step.args[0]))
        elif kind == "restart_reader":
            await self._restart_reader(self._reader(step.args[0]), step.args[1])
        elif kind == "restart_writer":
            await self.writer.stop()
            await deferLater(REACTOR, self.io_rng.uniform(0.0, 0.15), lambda: None)
            await self.writer.start()
            # Readers must see the typing stream start again from 0 before
            # it moves past their positions (see docs/reliability.md).
            await self.settle_and_check("a writer restart")
        elif kind == "stall_http":
            self.stall.stall_next += step.args[0]
        elif kind == "clock_jump":
            self.clock.jump(step.args[0])
        elif kind == "redis_restart":
            assert self.redis_server is not None
            await restart_redis(self.redis_server)
        elif kind == "redis_kill":
            await self._kill_redis_connection(*step.args)
        elif kind == "join":
            reader = self._reader(step.args[0])
            if not reader.running:
                await reader.start()
        else:
            raise AssertionError(f"unknown step {step}")

    async def _pause(self, reader: SqliteReader) -> None:
        """The reader stops reading while rows pile up, until the writer gives
        up on it (or enough rows went by); then it reads again."""
        if reader.redis is not None:
            await stall_subscriber(
                self, reader.redis, lambda: self.writes.bulk(self.rng.randint(100, 150))
            )
            return
        probe = reader.current_probe()
        if probe is None:
            return
        transport: Any = probe.proto.transport
        before = self.monitor.failed_to_keep_up
        transport.pauseProducing()
        try:
            for _ in range(8):
                await self.writes.bulk(self.rng.randint(60, 150))
                if self.monitor.failed_to_keep_up > before:
                    break
            deadline = REACTOR.seconds() + 1.5
            while probe.proto in (reader.handler.connections() if reader.handler else []):
                if self.monitor.failed_to_keep_up == before or REACTOR.seconds() > deadline:
                    break
                await deferLater(REACTOR, 0.01, lambda: None)
        finally:
            transport.resumeProducing()


    async def _restart_reader(self, reader: SqliteReader, writes_while_down: int) -> None:
        if not reader.running:
            return
        await reader.stop()
        for _ in range(writes_while_down):
            await self.writes.random_write()
        await reader.start()
