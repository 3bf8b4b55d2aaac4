# -*- test-case-name: tests.test_demo -*-
"""`synapse-replication demo`: a writer, workers in other processes, a
realistic load, and proof at the end that every worker got every row.

Why it exists: it is the first thing someone runs, and it must show the
library doing its real job on the embedded default (an SQLite file, TCP on
127.0.0.1), across process boundaries and under load, and then *check* the
result rather than only print numbers.

The pieces:

- the **writer** runs in this process (`start_writer`), with the HTTP
  catch-up listener for the in-memory `typing` stream;
- each **worker** is a child process (``synapse-replication demo-worker``,
  see `run_worker`) following `events`, `receipts` and `typing`. It catches
  up the persisted streams from the writer's SQLite file, opened read-only,
  and `typing` over HTTP from the writer. It reports on stdout, one JSON
  object per line (`WorkerReport`): progress every half second and, once its
  stdin says ``final`` (or closes), digests of the rows it holds. Halfway
  through the load the last worker is told to drop its connection, so that
  every run also goes through those catch-up paths;
- the **load** (`LoadGenerator`) writes rooms, members, messages (some
  non-ASCII, some in threads), state changes big and small, redactions,
  receipts and typing through the writer's stores, at a target rate;
- the **check** (`compare_worker`) compares each worker's digests with the
  digests the writer computes from its own store over the same token range
  (every `events` row; the latest receipt of each key, which is all the
  store keeps), and the worker's typing lists with the writer's.

A digest is sha256 over ``encode_json([token, row])`` lines, one per row in
delivery order, each row in its stream's canonical JSON form
(`Stream.row_to_json` of the parsed row), so both sides hash the same bytes
for the same rows whatever way they came (RDATA, a catch-up from the
database, ``0``/``1`` booleans from SQLite).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import secrets
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import IO, Any, Final, Literal, TypeVar

import attrs
from twisted.internet import stdio
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from synapse_replication._json import JsonValue, decode_json, encode_json_bytes
from synapse_replication.data_handler import ReplicationDataHandler
from synapse_replication.http import (
    HttpReplicationClient,
    InstanceLocation,
    ReplicationHttpResource,
    listen_http,
    make_replication_site,
)
from synapse_replication.instance import (
    WriterInstance,
    connect_worker,
    make_worker,
    start_writer,
)
from synapse_replication.storage import (
    MAX_STATE_UPDATES_PER_ROOM,
    Database,
    EventsStore,
    EventToPersist,
    ReceiptsStore,
    StreamIdGenerator,
)
from synapse_replication.streams import (
    EventsStream,
    ReceiptsStream,
    Stream,
    StreamUpdate,
    StreamUpdateResult,
    TypingStream,
    UpdateFunction,
)
from synapse_replication.streams.receipts import ReceiptsStreamRow
from synapse_replication.streams.typing import TypingStreamRow
from synapse_replication.tcp import Backoff
from synapse_replication.testing import inject

_log: Final = Logger(namespace="synapse_replication.demo")

T = TypeVar("T")

# The streams the demo writes and every worker follows, in display order.
DEMO_STREAMS: Final = (EventsStream.NAME, ReceiptsStream.NAME, TypingStream.NAME)
# Those kept in the writer's database, from which the writer recomputes what
# a worker must hold (see `DemoWorkerDataHandler`).
PERSISTED_STREAMS: Final = (EventsStream.NAME, ReceiptsStream.NAME)

WRITER_NAME: Final = "master"
SERVER_NAME: Final = "demo.local"
DB_FILE_NAME: Final = "homeserver.db"
# The worker replication secret reaches workers through their environment:
# a command line is visible to every user (`ps`), and the secret is never
# printed.
SECRET_ENV: Final = "SYNAPSE_REPLICATION_DEMO_SECRET"

# What the parent writes on a worker's stdin to ask for its final report, and
# to make it drop its replication connection (it reconnects and catches up).
FINAL_REQUEST: Final = b"final"
DISCONNECT_REQUEST: Final = b"disconnect"
REPORT_INTERVAL_S: Final = 0.5

# Exit codes of `run_demo`.
EXIT_OK: Final = 0
EXIT_MISMATCH: Final = 1
EXIT_SETUP_FAILED: Final = 3

# How long the demo waits for each phase before giving up.
CONNECT_TIMEOUT_S: Final = 30.0
CATCH_UP_TIMEOUT_S: Final = 60.0
FINAL_REPORT_TIMEOUT_S: Final = 30.0
WORKER_EXIT_TIMEOUT_S: Final = 5.0


class DemoError(Exception):
    """The demo cannot go on; the message says why, for the user, and
    `exit_code` what the process should exit with."""

    def __init__(self, message: str, exit_code: int = EXIT_SETUP_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def _sleep(clock: IReactorTime, seconds: float) -> None:
    await deferLater(clock, seconds)


async def _with_timeout(clock: IReactorTime, d: Deferred[T], timeout_s: float, what: str) -> T:
    """`d`'s result, or DemoError (and `d` cancelled) after `timeout_s`."""
    timed_out = False

    def expire() -> None:
        nonlocal timed_out
        timed_out = True
        d.cancel()

    timer = clock.callLater(timeout_s, expire)
    try:
        return await d
    except Exception:
        if timed_out:
            raise DemoError(f"timed out after {timeout_s:g}s {what}") from None
        raise
    finally:
        if timer.active():
            timer.cancel()


# -- digests


@attrs.frozen
class Digest:
    """How many rows, and the sha256 of their canonical lines."""

    rows: int
    sha256: str

    def to_json(self) -> dict[str, JsonValue]:
        return {"rows": self.rows, "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj: JsonValue) -> Digest:
        if type(obj) is not dict or type(obj.get("rows")) is not int:
            raise ValueError(f"a digest must be {{rows, sha256}}, not {obj!r:.80}")
        sha256 = obj.get("sha256")
        if type(sha256) is not str:
            raise ValueError(f"a digest must be {{rows, sha256}}, not {obj!r:.80}")
        return cls(obj["rows"], sha256)


class RowDigest:
    """Running sha256 and count of one stream's rows, in delivery order."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.count = 0

    def add(self, token: int, row_json: JsonValue) -> None:
        self._sha.update(encode_json_bytes([token, row_json]))
        self._sha.update(b"\n")
        self.count += 1

    def value(self) -> Digest:
        return Digest(self.count, self._sha.hexdigest())


def canonical_row(stream: type[Stream[Any]], row: JsonValue) -> JsonValue:
    """`row` as a store or the wire has it, in the form both sides hash:
    parsed and turned back into JSON (``0``/``1`` become booleans)."""
    return stream.row_to_json(stream.parse_row(row))


def digest_updates(stream: type[Stream[Any]], updates: Iterable[StreamUpdate]) -> RowDigest:
    """The digest of raw ``(token, row)`` updates, as a reader receiving them
    computes it."""
    digest = RowDigest()
    for token, row in updates:
        digest.add(token, canonical_row(stream, row))
    return digest


async def digest_from_source(
    stream: type[Stream[Any]],
    update_function: UpdateFunction,
    instance_name: str,
    from_token: int,
    upto_token: int,
) -> RowDigest:
    """The digest of every row `instance_name` wrote in
    ``(from_token, upto_token]``, paging through `update_function`."""
    digest = RowDigest()
    token = from_token
    while token < upto_token:
        updates, token, limited = await update_function(
            instance_name, token, upto_token, 10_000
        )
        for row_token, row in updates:
            digest.add(row_token, canonical_row(stream, row))
        if not limited:
            break
    return digest


# -- what workers report


ReportKind = Literal["progress", "final"]


def _int_map(value: Any, what: str, *, nullable: bool = False) -> dict[str, Any]:
    if type(value) is not dict:
        raise ValueError(f"{what} must be an object")
    for key, item in value.items():
        if type(item) is not int and not (nullable and item is None):
            raise ValueError(f"{what}[{key!r}] must be an integer")
    return value


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise ValueError(f"{what} must be an integer")
    return value


@attrs.frozen
class WorkerReport:
    """One line a worker writes on its stdout.

    `positions`: per stream, the worker's position for the writer (None until
    the first POSITION); `start`: that first position, after which every row
    must reach the worker; `rows`: rows received, and `fetched` how many of
    them came through a catch-up (from the database or over HTTP) rather
    than RDATA; `disconnects`: connections dropped on request. A ``final``
    report adds
    `digests`, per persisted stream, of the rows the worker holds (see
    `DemoWorkerDataHandler`) and `typing`, its typing lists (see
    `normalize_typing`).
    """

    kind: ReportKind
    worker: str
    connected: bool
    positions: dict[str, int | None]
    start: dict[str, int]
    rows: dict[str, int]
    fetched: dict[str, int] = attrs.field(factory=dict)
    disconnects: int = 0
    digests: dict[str, Digest] = attrs.field(factory=dict)
    typing: dict[str, list[str]] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {
            "kind": self.kind,
            "worker": self.worker,
            "connected": self.connected,
            "positions": self.positions,
            "start": self.start,
            "rows": self.rows,
            "fetched": self.fetched,
            "disconnects": self.disconnects,
        }
        if self.kind == "final":
            out["digests"] = {name: d.to_json() for name, d in self.digests.items()}
            out["typing"] = self.typing
        return out

    @classmethod
    def from_json(cls, obj: JsonValue) -> WorkerReport:
        """A report from its JSON form; ValueError naming what is wrong."""
        if type(obj) is not dict:
            raise ValueError("a report must be a JSON object")
        kind = obj.get("kind")
        if kind != "progress" and kind != "final":
            raise ValueError(f"unknown report kind {kind!r}")
        worker = obj.get("worker")
        if type(worker) is not str:
            raise ValueError("worker must be a string")
        connected = obj.get("connected")
        if type(connected) is not bool:
            raise ValueError("connected must be a boolean")
        digests = obj.get("digests", {})
        if type(digests) is not dict:
            raise ValueError("digests must map stream names to digests")
        typing_state = obj.get("typing", {})
        if type(typing_state) is not dict or not all(
            type(v) is list and all(type(u) is str for u in v) for v in typing_state.values()
        ):
            raise ValueError("typing must map room ids to lists of user ids")
        return cls(
            kind=kind,
            worker=worker,
            connected=connected,
            positions=_int_map(obj.get("positions"), "positions", nullable=True),
            start=_int_map(obj.get("start"), "start"),
            rows=_int_map(obj.get("rows"), "rows"),
            fetched=_int_map(obj.get("fetched", {}), "fetched"),
            disconnects=_int(obj.get("disconnects", 0), "disconnects"),
            digests={name: Digest.from_json(d) for name, d in digests.items()},
            typing=typing_state,
        )


def normalize_typing(state: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Typing lists without the rooms where nobody types: whether a reader
    knows of a room whose last typist stopped does not matter."""
    return {room: list(users) for room, users in sorted(state.items()) if users}


# -- the worker process


def receipt_key(row: ReceiptsStreamRow) -> tuple[str, str, str, str | None]:
    """A receipt replaces the previous one with the same key."""
    return row.room_id, row.receipt_type, row.user_id, row.thread_id


class DemoWorkerDataHandler(ReplicationDataHandler):
    """A worker's data handler: holds what each stream promises a reader,
    and remembers where each stream started for it.

    What a reader is promised differs per stream, and so does what is kept:

    - `events`: every row, in order (rows are never taken back): a running
      digest of all rows received;
    - `receipts`: the latest receipt of every key. A new receipt replaces
      the stored one, so a reader that catches up from the database never
      sees the replaced ones (and one that got them live does). Kept: the
      latest row per `receipt_key`, hashed in token order at the end, which
      is what the writer's store holds after the worker's start;
    - `typing`: the current lists: kept as they are, compared as a whole.
    """

    def __init__(self) -> None:
        super().__init__()
        self.received: dict[str, int] = dict.fromkeys(DEMO_STREAMS, 0)
        self.start: dict[str, int] = {}
        self.events = RowDigest()
        self.receipts: dict[tuple[str, str, str, str | None], StreamUpdate] = {}
        self.typing: dict[str, tuple[str, ...]] = {}

    def process_rows(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> None:
        self.received[stream_name] = self.received.get(stream_name, 0) + len(rows)
        for row in rows:
            if stream_name == EventsStream.NAME:
                self.events.add(token, EventsStream.row_to_json(row))
            elif isinstance(row, ReceiptsStreamRow):
                self.receipts[receipt_key(row)] = (token, ReceiptsStream.row_to_json(row))
            elif isinstance(row, TypingStreamRow):
                self.typing[row.room_id] = row.user_ids

    def digests(self) -> dict[str, Digest]:
        """The digests of the persisted streams' rows held."""
        latest = sorted(self.receipts.values(), key=lambda update: update[0])
        receipts = RowDigest()
        for token, row in latest:
            receipts.add(token, row)
        return {EventsStream.NAME: self.events.value(), ReceiptsStream.NAME: receipts.value()}

    def process_reset(self, stream_name: str, instance_name: str, token: int) -> None:
        # The typing writer restarted: its lists start again from nothing.
        if stream_name == TypingStream.NAME:
            self.typing.clear()

    def on_position(self, stream_name: str, instance_name: str, token: int) -> None:
        if self.get_position(stream_name, instance_name) is None:
            # The first POSITION: every row after it is ours to receive.
            self.start[stream_name] = token
        super().on_position(stream_name, instance_name, token)

    def report(
        self,
        kind: ReportKind,
        worker: str,
        writer_name: str,
        connected: bool,
        fetched: Mapping[str, int] | None = None,
        disconnects: int = 0,
    ) -> WorkerReport:
        final = kind == "final"
        return WorkerReport(
            kind=kind,
            worker=worker,
            connected=connected,
            positions={name: self.get_position(name, writer_name) for name in DEMO_STREAMS},
            start=dict(self.start),
            rows=dict(self.received),
            fetched=dict(fetched or {}),
            disconnects=disconnects,
            digests=self.digests() if final else {},
            typing=normalize_typing(self.typing) if final else {},
        )


@implementer(IHalfCloseableProtocol)
class _ParentChannel(LineOnlyReceiver):
    """A worker's stdin and stdout: reports go out, the final request comes in.

    Half-closeable, so that the parent closing our stdin (or going away)
    asks for the final report instead of also closing stdout before the
    report is written.
    """

    delimiter = b"\n"

    def __init__(self, on_disconnect: Callable[[], None] = lambda: None) -> None:
        self.final_requested: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self._on_disconnect = on_disconnect

    def _request_final(self) -> None:
        if not self.final_requested.called:
            self.final_requested.callback(None)

    def lineReceived(self, line: bytes) -> None:
        command = line.strip()
        if command == FINAL_REQUEST:
            self._request_final()
        elif command == DISCONNECT_REQUEST:
            self._on_disconnect()

    def readConnectionLost(self) -> None:
        self._request_final()

    def writeConnectionLost(self) -> None:
        # Nobody reads us any more (the parent died): finish. Nothing is left
        # to flush, and StandardIO will not call connectionLost for this.
        self._request_final()
        self._closed()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._request_final()
        self._closed()

    def _closed(self) -> None:
        if not self.closed.called:
            self.closed.callback(None)

    def send(self, report: WorkerReport) -> None:
        if self.transport is not None and not self.closed.called:
            self.transport.write(encode_json_bytes(report.to_json()) + b"\n")


@attrs.frozen(kw_only=True)
class WorkerOptions:
    """What a worker process is told (the secret through its environment)."""

    name: str
    writer_host: str
    writer_port: int
    http_port: int
    db_path: str
    secret: str
    server_name: str = SERVER_NAME
    writer_name: str = WRITER_NAME
    report_interval_s: float = REPORT_INTERVAL_S


def _ignore() -> None:
    """The notify callback of stores that never write."""


def reader_sources(
    db: Database, typing_updates: UpdateFunction, writer_name: str
) -> dict[str, UpdateFunction]:
    """Where a worker fetches rows it missed: the persisted streams from the
    writer's database (opened read-only), `typing` through `typing_updates`."""
    # Only read: these stores' id generators never hand out an id.
    events = EventsStore(db, StreamIdGenerator(writer_name, 0), writer_name, _ignore)
    receipts = ReceiptsStore(db, StreamIdGenerator(writer_name, 0), writer_name, _ignore)
    return {
        EventsStream.NAME: events.get_updates,
        ReceiptsStream.NAME: receipts.get_updates,
        TypingStream.NAME: typing_updates,
    }


def counting(update: UpdateFunction, counts: dict[str, int], name: str) -> UpdateFunction:
    """`update`, adding the rows it returns to ``counts[name]``: how the
    report tells rows fetched in a catch-up from rows that came as RDATA."""

    async def fetch(
        instance_name: str, from_token: int, upto_token: int, target_row_count: int
    ) -> StreamUpdateResult:
        result = await update(instance_name, from_token, upto_token, target_row_count)
        counts[name] = counts.get(name, 0) + len(result[0])
        return result

    return fetch


async def run_worker(reactor: Any, options: WorkerOptions) -> int:
    """The ``demo-worker`` process: follow the writer, reporting on stdout,
    until asked for the final report. Returns the exit code."""
    disconnects = 0

    def disconnect() -> None:
        # As a network failure would: the client factory reconnects.
        nonlocal disconnects
        disconnects += 1
        for connection in worker.handler.connections():
            connection.close()

    channel = _ParentChannel(disconnect)
    stdio.StandardIO(channel, reactor=reactor)  # type: ignore[no-untyped-call]  # Twisted leaves StandardIO unannotated
    db = Database.sqlite_reader(options.db_path, reactor)
    http_client = HttpReplicationClient(
        reactor,
        {options.writer_name: InstanceLocation("127.0.0.1", options.http_port)},
        options.secret,
    )
    data = DemoWorkerDataHandler()
    fetched = dict.fromkeys(DEMO_STREAMS, 0)
    sources = reader_sources(
        db, http_client.update_function(TypingStream.NAME), options.writer_name
    )
    worker = make_worker(
        reactor,
        instance_name=options.name,
        server_name=options.server_name,
        sources={name: counting(update, fetched, name) for name, update in sources.items()},
        data_handler=data,
        stream_writers={name: [options.writer_name] for name in DEMO_STREAMS},
        backoff=Backoff(initial=0.2, maximum=2.0),
    )

    def report(kind: ReportKind) -> None:
        connected = worker.handler.connected()
        channel.send(
            data.report(
                kind, options.name, options.writer_name, connected, fetched, disconnects
            )
        )

    reporter = LoopingCall(report, "progress")
    reporter.clock = reactor
    try:
        connect_worker(reactor, worker, options.writer_host, options.writer_port)
        reporter.start(options.report_interval_s, now=True)
        await channel.final_requested
    finally:
        if reporter.running:
            reporter.stop()
        worker.stop()
        await http_client.close()
        db.close()
    report("final")
    if channel.transport is not None:
        channel.transport.loseConnection()
    await _with_timeout(reactor, channel.closed, 5.0, "writing the final report")
    return 0


# -- the load


_WORDS: Final = (
    "the", "replication", "stream", "keeps", "every", "worker", "in", "step",
    "with", "writer", "while", "rooms", "fill", "up", "messages", "receipts",
    "and", "typing", "notifications", "from", "people", "all", "over", "federation",
    "who", "never", "stop", "talking", "about", "lunch",
)
_NON_ASCII: Final = (
    "Grüße aus München",
    "¿Qué tal, señor?",
    "日本語のメッセージです",
    "Привет, мир",
    "naïve café ☕",
    "emoji 🎉🚀 and a clef 𝄞 (astral: a surrogate pair on the wire)",
    "Ελληνικά γράμματα",
    "עברית מימין לשמאל",
)
_USER_NAMES: Final = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    "ivan", "judy", "mallory", "niaj", "olivia", "peggy", "rupert", "sybil",
    "trent", "victor", "walter", "yolanda", "zoe",
)
# Puppets a bridge joins at once: enough for a ``state-all`` row.
_BRIDGE_JOIN_SIZES: Final = (MAX_STATE_UPDATES_PER_ROOM, MAX_STATE_UPDATES_PER_ROOM + 100)


def state_rows(changes: int) -> int:
    """How many `events` rows a room's `changes` state changes at one token
    become: one ``state`` row each, or one ``state-all`` row for many."""
    return 1 if changes >= MAX_STATE_UPDATES_PER_ROOM else changes


@attrs.define
class _Room:
    room_id: str
    creator: str
    members: list[str]
    depth: int = 0
    messages: deque[str] = attrs.Factory(lambda: deque(maxlen=64))
    thread_roots: deque[str] = attrs.Factory(lambda: deque(maxlen=8))
    # (thread root, a reply in that thread)
    thread_replies: deque[tuple[str, str]] = attrs.Factory(lambda: deque(maxlen=16))


class LoadGenerator:
    """Writes a realistic mix into a writer's stores at a target rate.

    Rates are in stream rows, what replication carries, counted as the stores
    stream them: an event is an ``ev`` row plus a ``state`` row if it changes
    current state; a state delta of `MAX_STATE_UPDATES_PER_ROOM` keys or more
    is one ``state-all`` row; a receipt is a row; a typing change is a row.
    `rng` drives the choices; event and room ids come from
    `synapse_replication.testing.inject` and are new on every run, so runs
    can share a database. Several tasks write at once, as a homeserver's
    request handlers would,
    so each action updates the rooms' bookkeeping (members, messages) before
    it awaits its write: another task must not pick a member who is leaving.
    """

    def __init__(self, writer: WriterInstance, rng: random.Random, clock: IReactorTime) -> None:
        self._writer = writer
        self._events = writer.stores.events
        self._receipts = writer.stores.receipts
        self._typing = writer.typing
        self._rng = rng
        self._clock = clock
        self._server = writer.server_name
        self.users = [f"@{name}:{self._server}" for name in _USER_NAMES] + [
            f"@user{i}:{self._server}" for i in range(80)
        ]
        self.rooms: list[_Room] = []
        # Rows written to the persisted streams, as counted here.
        self.rows: dict[str, int] = dict.fromkeys(PERSISTED_STREAMS, 0)
        # How often each kind of action ran, for the summary.
        self.actions: dict[str, int] = {}
        self._bridges = 0
        self._big_state_done = False
        # Events stored as outliers before the load, made real during it.
        self._outliers: list[str] = []

    def typing_rows(self) -> int:
        """Typing rows written so far, timeouts included: the typing token."""
        return self._typing.current_token(self._writer.instance_name)

    def rows_written(self, stream_name: str) -> int:
        if stream_name == TypingStream.NAME:
            return self.typing_rows()
        return self.rows[stream_name]

    def total_rows(self) -> int:
        return sum(self.rows.values()) + self.typing_rows()

    async def prepare(self, rooms: int = 3, outliers: int = 40) -> None:
        """What the database holds before the load: a few rooms, and events
        backfilled as outliers that the load turns into real events.

        Outliers are written here, before any worker starts, because making
        one real changes its ``ev`` row (``outlier`` becomes false): a reader
        that got the row before has the old value, and a digest of the store's
        rows would differ from one of the rows as they were sent. Rows written
        here are not counted in `rows`.
        """
        for _ in range(rooms):
            await self._create_room()
        room = self.rooms[0]
        events = [
            self._event(
                room,
                "m.room.message",
                self._rng.choice(room.members),
                {"msgtype": "m.text", "body": self._body()},
                outlier=True,
            )
            for _ in range(outliers)
        ]
        await self._events.persist_events(events)
        self._outliers = [e.event_id for e in events]
        self.rows = dict.fromkeys(PERSISTED_STREAMS, 0)

    async def run(self, duration_s: float, rate: float, concurrency: int = 8) -> None:
        """Write for `duration_s` seconds at about `rate` rows per second."""
        start = self._clock.seconds()
        base = self.total_rows()
        deadline = start + duration_s
        if not self.rooms:
            await self._create_room()

        async def task() -> None:
            while True:
                now = self._clock.seconds()
                if now >= deadline:
                    return
                budget = int(rate * (now - start)) - (self.total_rows() - base)
                if budget <= 0:
                    await _sleep(self._clock, 0.01)
                else:
                    await self.step(min(budget, 40), (now - start) / duration_s)

        results = await DeferredList(
            [Deferred.fromCoroutine(task()) for _ in range(concurrency)], consumeErrors=True
        )
        for ok, result in results:
            if not ok:
                assert isinstance(result, Failure)
                result.raiseException()

    async def step(self, budget: int, progress: float) -> None:
        """One action writing about `budget` rows. `progress` (0 to 1) makes
        sure the rare big state change happens once in every run."""
        action: Callable[[int], Awaitable[None]]
        if not self._big_state_done and progress > 0.4:
            self._big_state_done = True
            action = self._bridge_joins
        else:
            weighted: list[tuple[Callable[[int], Awaitable[None]], float]] = [
                (self._messages, 40),
                (self._receipts_batch, 30),
                (self._typing_changes, 18),
                (self._state_change, 5),
                (self._membership, 6),
                (self._redaction, 3),
                (self._new_room, 0.6 if len(self.rooms) < 40 else 0.1),
                (self._state_reset, 1),
                (self._backfill, 1),
                (self._bridge_joins, 0.05),
            ]
            action = self._rng.choices(
                [a for a, _ in weighted], [w for _, w in weighted]
            )[0]
        name = action.__name__.strip("_").replace("_", " ")
        self.actions[name] = self.actions.get(name, 0) + 1
        await action(max(1, budget))

    # -- helpers

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _room(self) -> _Room:
        # Busier rooms get more traffic.
        return self._rng.choices(self.rooms, [min(len(r.members), 30) for r in self.rooms])[0]

    def _event(
        self,
        room: _Room,
        event_type: str,
        sender: str,
        content: Mapping[str, Any],
        **fields: Any,
    ) -> EventToPersist:
        room.depth += 1
        return EventToPersist(
            event_id=inject.make_event_id(),
            room_id=room.room_id,
            type=event_type,
            sender=sender,
            origin_server_ts=self._now_ms(),
            depth=room.depth,
            content=content,
            **fields,
        )

    def _state_event(
        self, room: _Room, event_type: str, content: Mapping[str, Any]
    ) -> EventToPersist:
        return self._event(room, event_type, room.creator, content, state_key="")

    def _member_event(
        self, room: _Room, user: str, membership: str, sender: str | None = None
    ) -> EventToPersist:
        display_name = user[1:].split(":")[0].title()
        return self._event(
            room,
            "m.room.member",
            sender or user,
            {"membership": membership, "displayname": display_name},
            state_key=user,
            membership=membership,
        )

    async def _persist(
        self,
        events: Sequence[EventToPersist],
        state_delta: Mapping[str, Mapping[tuple[str, str], str | None]] | None = None,
    ) -> None:
        await self._events.persist_events(events, state_delta)
        rows = len(events)
        if state_delta is None:
            rows += sum(
                1 for e in events if e.state_key is not None and not e.rejected and not e.outlier
            )
        else:
            rows += sum(state_rows(len(changes)) for changes in state_delta.values())
        self.rows[EventsStream.NAME] += rows

    def _body(self) -> str:
        rng = self._rng
        if rng.random() < 0.15:
            return rng.choice(_NON_ASCII)
        return " ".join(rng.choices(_WORDS, k=rng.randint(2, 14))).capitalize()

    # -- actions, each worth about `budget` rows

    async def _create_room(self) -> None:
        rng = self._rng
        creator = rng.choice(self.users)
        room = _Room(inject.make_room_id(self._server), creator, [creator])
        name = " ".join(rng.choices(_WORDS, k=2)).title()
        await self._persist(
            [
                self._state_event(room, "m.room.create", {"creator": creator, "room_version": "10"}),
                self._member_event(room, creator, "join"),
                self._state_event(
                    room,
                    "m.room.power_levels",
                    {"users": {creator: 100}, "events_default": 0, "state_default": 50},
                ),
                self._state_event(room, "m.room.join_rules", {"join_rule": "public"}),
                self._state_event(
                    room, "m.room.history_visibility", {"history_visibility": "shared"}
                ),
                self._state_event(room, "m.room.name", {"name": name}),
            ]
        )
        joiners = rng.sample([u for u in self.users if u != creator], rng.randint(2, 14))
        await self._persist([self._member_event(room, u, "join") for u in joiners])
        room.members.extend(joiners)
        self.rooms.append(room)

    async def _new_room(self, budget: int) -> None:
        await self._create_room()

    async def _messages(self, budget: int) -> None:
        """A burst of messages in one room, persisted as one batch; some are
        non-ASCII, some start threads, some reply in them."""
        rng = self._rng
        room = self._room()
        events = []
        new_roots = []
        replies = []
        for _ in range(rng.randint(1, min(budget, 25))):
            sender = rng.choice(room.members)
            content: dict[str, Any] = {"msgtype": "m.text", "body": self._body()}
            if room.thread_roots and rng.random() < 0.25:
                root = rng.choice(room.thread_roots)
                content["m.relates_to"] = {"rel_type": "m.thread", "event_id": root}
                event = self._event(
                    room,
                    "m.room.message",
                    sender,
                    content,
                    relates_to=root,
                    relation_type="m.thread",
                )
                replies.append((root, event.event_id))
            else:
                event = self._event(room, "m.room.message", sender, content)
                if rng.random() < 0.06:
                    new_roots.append(event.event_id)
            events.append(event)
        await self._persist(events)
        room.messages.extend(e.event_id for e in events)
        room.thread_roots.extend(new_roots)
        room.thread_replies.extend(replies)

    async def _receipts_batch(self, budget: int) -> None:
        """Read receipts: unthreaded, on the main timeline, or in a thread;
        public or private."""
        rng = self._rng
        for _ in range(rng.randint(1, min(budget, 8))):
            room = self._room()
            if not room.messages:
                continue
            kind = rng.random()
            thread_id: str | None
            if kind < 0.2 and room.thread_replies:
                thread_id, event_id = rng.choice(room.thread_replies)
            elif kind < 0.5:
                thread_id, event_id = "main", room.messages[-1]
            else:
                thread_id, event_id = None, rng.choice(list(room.messages)[-5:])
            await self._receipts.insert_receipt(
                room.room_id,
                "m.read" if rng.random() < 0.8 else "m.read.private",
                rng.choice(room.members),
                event_id,
                thread_id,
                {"ts": self._now_ms()},
            )
            self.rows[ReceiptsStream.NAME] += 1

    async def _typing_changes(self, budget: int) -> None:
        """People start typing (for a few seconds, unless they stop first)."""
        rng = self._rng
        for _ in range(rng.randint(1, min(budget, 4))):
            typing_now = [
                (room_id, user)
                for room_id, users in self._typing.typing_state().items()
                for user in users
            ]
            if typing_now and rng.random() < 0.4:
                room_id, user = rng.choice(typing_now)
                inject.inject_typing(self._typing, room_id, user, typing=False)
            else:
                room = self._room()
                user = rng.choice(room.members)
                timeout_ms = rng.randint(1_500, 8_000)
                inject.inject_typing(self._typing, room.room_id, user, timeout_ms=timeout_ms)

    async def _state_change(self, budget: int) -> None:
        """A new topic, name or power levels."""
        rng = self._rng
        room = self._room()
        kind = rng.random()
        if kind < 0.45:
            event = self._state_event(room, "m.room.topic", {"topic": self._body()})
        elif kind < 0.75:
            name = " ".join(rng.choices(_WORDS, k=rng.randint(1, 3))).title()
            event = self._state_event(room, "m.room.name", {"name": name})
        else:
            promoted = rng.sample(room.members, min(5, len(room.members)))
            levels = {u: rng.choice((0, 50, 100)) for u in promoted}
            levels[room.creator] = 100
            event = self._state_event(
                room, "m.room.power_levels", {"users": levels, "state_default": 50}
            )
        await self._persist([event])

    async def _membership(self, budget: int) -> None:
        """Someone joins (maybe invited first), leaves or is banned."""
        rng = self._rng
        room = self._room()
        outsiders = [u for u in self.users if u not in room.members]
        leavers = [u for u in room.members if u != room.creator]
        if outsiders and (not leavers or rng.random() < 0.6):
            user = rng.choice(outsiders)
            events = [self._member_event(room, user, "join")]
            if rng.random() < 0.3:
                events.insert(0, self._member_event(room, user, "invite", room.creator))
            room.members.append(user)
            await self._persist(events)
        elif leavers:
            user = rng.choice(leavers)
            if rng.random() < 0.1:
                event = self._member_event(room, user, "ban", room.creator)
            else:
                event = self._member_event(room, user, "leave")
            room.members.remove(user)
            await self._persist([event])

    async def _redaction(self, budget: int) -> None:
        room = self._room()
        if not room.messages:
            return
        target = self._rng.choice(list(room.messages))
        room.messages.remove(target)
        await self._persist(
            [self._event(room, "m.room.redaction", room.creator, {"reason": "spam"}, redacts=target)]
        )

    async def _state_reset(self, budget: int) -> None:
        """Current state changes without a new event, as state resolution
        does: some members drop out of the room's state at one token."""
        rng = self._rng
        room = self._room()
        leavers = [u for u in room.members if u != room.creator]
        if not leavers:
            return
        dropped = rng.sample(leavers, min(len(leavers), rng.randint(1, 12)))
        changes: dict[tuple[str, str], str | None] = {("m.room.member", u): None for u in dropped}
        for user in dropped:
            room.members.remove(user)
        if await self._events.update_current_state(room.room_id, changes) is not None:
            self.rows[EventsStream.NAME] += state_rows(len(changes))

    async def _bridge_joins(self, budget: int) -> None:
        """A bridge joins a crowd of puppets at once: one batch whose state
        delta is too big for ``state`` rows, so readers get ``state-all``."""
        rng = self._rng
        room = self._room()
        self._bridges += 1
        count = rng.randint(*_BRIDGE_JOIN_SIZES)
        puppets = [f"@_bridge{self._bridges}_{i}:{self._server}" for i in range(count)]
        events = [self._member_event(room, p, "join") for p in puppets]
        delta: dict[tuple[str, str], str | None] = {
            ("m.room.member", p): e.event_id for p, e in zip(puppets, events, strict=True)
        }
        await self._persist(events, {room.room_id: delta})
        room.members.extend(puppets)

    async def _backfill(self, budget: int) -> None:
        """Events backfilled earlier as outliers become real events (each an
        ``ex_outlier_stream`` row: an ``ev`` row at a new token)."""
        count = min(len(self._outliers), self._rng.randint(1, 3))
        if count == 0:
            return
        event_ids, self._outliers = self._outliers[:count], self._outliers[count:]
        await self._events.de_outlier_events(event_ids)
        self.rows[EventsStream.NAME] += count


# -- the parent's side of a worker process


class WorkerProcess(ProcessProtocol):
    """A worker child process as the parent sees it: its reports, its end.

    `latest` is the last report and `final_report` the final one once it
    came; `exit_status` says how the process ended, once it has. The worker's
    stderr (its log) goes to `on_stderr`, line by line.
    """

    def __init__(self, name: str, clock: IReactorTime, on_stderr: Callable[[str], None]) -> None:
        self.name = name
        self._clock = clock
        self._on_stderr = on_stderr
        self.latest: WorkerReport | None = None
        # (time received, rows per stream) of recent reports, for rates.
        self.history: deque[tuple[float, dict[str, int]]] = deque(maxlen=16)
        self.final_report: WorkerReport | None = None
        self.exit_status: str | None = None
        self._final_waiters: list[Deferred[WorkerReport | None]] = []
        self._out = b""
        self._err = b""

    @property
    def running(self) -> bool:
        return self.exit_status is None

    def outReceived(self, data: bytes) -> None:
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            if line.strip():
                self._report_line(line)

    def _report_line(self, line: bytes) -> None:
        try:
            report = WorkerReport.from_json(decode_json(line))
        except ValueError as e:
            _log.warn("Unreadable report from {worker}: {error}", worker=self.name, error=e)
            return
        self.latest = report
        self.history.append((self._clock.seconds(), dict(report.rows)))
        if report.kind == "final" and self.final_report is None:
            self.final_report = report
            self._wake_final_waiters()

    def errReceived(self, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            self._on_stderr(f"{self.name}: {line.decode('utf-8', 'replace')}")

    def processEnded(self, reason: Failure) -> None:
        if self._err:
            self.errReceived(b"\n")
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.exit_status = f"signal {signal}" if signal else f"code {code}"
        self._wake_final_waiters()

    def _wake_final_waiters(self) -> None:
        waiters, self._final_waiters = self._final_waiters, []
        for d in waiters:
            d.callback(self.final_report)

    def wait_final(self) -> Deferred[WorkerReport | None]:
        """Fires with the final report, or None if the process ended without
        sending one."""
        if self.final_report is not None or not self.running:
            d: Deferred[WorkerReport | None] = Deferred()
            d.callback(self.final_report)
            return d
        d = Deferred()
        self._final_waiters.append(d)
        return d

    def rates(self) -> dict[str, float]:
        """Rows per second received over about the last second."""
        if len(self.history) < 2:
            return {}
        end_time, end_rows = self.history[-1]
        start_time, start_rows = self.history[0]
        for when, rows in reversed(self.history):
            start_time, start_rows = when, rows
            if end_time - when >= 0.9:
                break
        elapsed = end_time - start_time
        if elapsed <= 0:
            return {}
        return {
            name: (count - start_rows.get(name, 0)) / elapsed for name, count in end_rows.items()
        }

    def request_disconnect(self) -> None:
        """Ask the worker to drop its replication connection, as a network
        failure would: it reconnects and catches up."""
        if self.running and self.transport is not None:
            self.transport.write(DISCONNECT_REQUEST + b"\n")

    def request_final(self) -> None:
        """Ask for the final report: a line on stdin, then stdin closed."""
        if self.running and self.transport is not None:
            self.transport.write(FINAL_REQUEST + b"\n")
            self.transport.closeStdin()

    def kill(self) -> None:
        if self.running and self.transport is not None:
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess("KILL")


# -- progress display


@attrs.frozen
class WorkerProgress:
    """One worker's line of a progress snapshot."""

    name: str
    status: str  # "connected", "connecting", or how it exited
    rates: dict[str, float]
    lags: dict[str, int | None]
    note: str = ""  # e.g. connections dropped and rows caught up

    def describe(self) -> str:
        return f"{self.status} ({self.note})" if self.note else self.status


@attrs.frozen(kw_only=True)
class ProgressSnapshot:
    """What one refresh of the progress display shows."""

    phase: str
    elapsed_s: float
    phase_total_s: float | None
    writer_rates: dict[str, float]
    writer_tokens: dict[str, int]
    workers: tuple[WorkerProgress, ...]


def _fmt(value: float | int | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _phase_title(snapshot: ProgressSnapshot) -> str:
    title = f"{snapshot.phase} {snapshot.elapsed_s:.1f}s"
    if snapshot.phase_total_s is not None:
        title += f" of {snapshot.phase_total_s:g}s"
    return title


def render_table(snapshot: ProgressSnapshot) -> list[str]:
    """The compact table shown (and redrawn in place) on a terminal: rows/s
    and token for the writer, rows/s received and lag (writer token minus the
    worker's position) per worker, then a line per worker with news."""
    top = f"{_phase_title(snapshot):<20}{'writer':>7}"
    header = f"{'stream':<9}{'rows/s':>9}{'token':>9}"
    for worker in snapshot.workers:
        top += f"{worker.name:>18}"
        header += f"{'rows/s':>11}{'lag':>7}"
    lines = [top, header]
    for stream in DEMO_STREAMS:
        line = (
            f"{stream:<9}{_fmt(snapshot.writer_rates.get(stream)):>9}"
            f"{_fmt(snapshot.writer_tokens.get(stream)):>9}"
        )
        for worker in snapshot.workers:
            line += f"{_fmt(worker.rates.get(stream)):>11}{_fmt(worker.lags.get(stream)):>7}"
        lines.append(line)
    lines.extend(f"{w.name}: {w.describe()}" for w in snapshot.workers if w.describe() != "connected")
    return lines


def render_line(snapshot: ProgressSnapshot) -> str:
    """One line per refresh, for logs and pipes: rates and lags per stream in
    `DEMO_STREAMS` order (events/receipts/typing)."""

    def per_stream(values: Mapping[str, float | int | None]) -> str:
        return "/".join(_fmt(values.get(s)) for s in DEMO_STREAMS)

    parts = [
        f"[{_phase_title(snapshot)}] writer rows/s "
        f"{per_stream(snapshot.writer_rates)}"
    ]
    for worker in snapshot.workers:
        text = f"{worker.name} rows/s {per_stream(worker.rates)} lag {per_stream(worker.lags)}"
        notes = [n for n in (worker.status, worker.note) if n and n != "connected"]
        if notes:
            text += f" ({'; '.join(notes)})"
        parts.append(text)
    return " | ".join(parts)


class ProgressDisplay:
    """Shows progress snapshots: on a terminal a table redrawn in place (ANSI
    cursor-up), otherwise one line per snapshot. A table wider than the
    terminal would wrap and break the redrawing, so then lines are shown."""

    def __init__(self, out: IO[str], tty: bool, columns: int | None = None) -> None:
        self._out = out
        self.tty = tty
        self._columns = columns or shutil.get_terminal_size().columns
        self._drawn = 0

    def note(self, text: str) -> None:
        """A line of its own; on a terminal, above the table, which is then
        drawn again below it."""
        if self.tty and self._drawn:
            # Up to the table's first line, and clear from there down.
            self._out.write(f"\x1b[{self._drawn}A\r\x1b[J")
            self._drawn = 0
        self._out.write(text + "\n")
        self._out.flush()

    def show(self, snapshot: ProgressSnapshot) -> None:
        if not self.tty:
            self._out.write(render_line(snapshot) + "\n")
        else:
            lines = render_table(snapshot)
            if max(len(line) for line in lines) >= self._columns:
                self.tty = False
                self.show(snapshot)
                return
            # Back to the table's first line, clear to the end of the screen
            # (the table may have shrunk), draw it again.
            text = f"\x1b[{self._drawn}A\r\x1b[J" if self._drawn else ""
            text += "".join(f"{line}\n" for line in lines)
            self._drawn = len(lines)
            self._out.write(text)
        self._out.flush()


def describe_catch_up(report: WorkerReport) -> str:
    """What a worker fetched out of band after its connection dropped."""
    fetched = report.fetched
    times = "once" if report.disconnects == 1 else f"{report.disconnects} times"
    return (
        f"dropped its connection {times} and caught up "
        f"{fetched.get(EventsStream.NAME, 0):,} events and "
        f"{fetched.get(ReceiptsStream.NAME, 0):,} receipts rows from SQLite, "
        f"{fetched.get(TypingStream.NAME, 0):,} typing rows over HTTP"
    )


# -- the check


@attrs.frozen
class Expected:
    """What a worker must hold for one stream at the end: the writer's
    position and, for persisted streams, the row count and digest of the
    rows after the worker's start; for typing, the writer's lists."""

    token: int
    digest: Digest | None = None
    typing: dict[str, list[str]] | None = None


@attrs.frozen
class StreamCheck:
    """One stream of one worker: whether it holds what it must, and a
    detail for the summary (counts when fine, the difference when not)."""

    stream: str
    ok: bool
    detail: str


@attrs.frozen
class WorkerVerdict:
    """A worker's result: OK only if it reported and every stream checked
    out; `problem` when there was nothing to check (no final report)."""

    worker: str
    checks: tuple[StreamCheck, ...]
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and bool(self.checks) and all(c.ok for c in self.checks)

    def describe(self) -> str:
        if self.problem is not None:
            return self.problem
        if self.ok:
            return ", ".join(c.detail for c in self.checks)
        return "; ".join(f"{c.stream}: {c.detail}" for c in self.checks if not c.ok)


def _check_stream(report: WorkerReport, stream: str, expected: Expected) -> StreamCheck:
    # The position first: digests of a worker that stopped short would only
    # say "different", the position says why.
    position = report.positions.get(stream)
    if position != expected.token:
        return StreamCheck(
            stream, False, f"at token {_fmt(position)}, the writer at {expected.token:,}"
        )
    if expected.typing is not None:
        if report.typing == expected.typing:
            count = len(expected.typing)
            return StreamCheck(stream, True, f"typing in {count} room{'' if count == 1 else 's'}")
        rooms = sorted(
            room
            for room in set(report.typing) | set(expected.typing)
            if report.typing.get(room) != expected.typing.get(room)
        )
        shown = ", ".join(rooms[:3]) + (f" and {len(rooms) - 3} more" if len(rooms) > 3 else "")
        return StreamCheck(stream, False, f"typing differs from the writer's in {shown}")
    digest = report.digests.get(stream)
    if digest is None:
        return StreamCheck(stream, False, "no digest in the final report")
    if digest == expected.digest:
        detail = f"{stream} {digest.rows:,} rows"
        received = report.rows.get(stream, 0)
        if received != digest.rows:
            detail += f" (of {received:,} received; the others were replaced)"
        return StreamCheck(stream, True, detail)
    want = expected.digest
    return StreamCheck(
        stream,
        False,
        f"holds {digest.rows:,} rows (sha256 {digest.sha256[:12]}), the writer "
        f"{_fmt(want.rows if want else None)} (sha256 {want.sha256[:12] if want else '-'})",
    )


def compare_worker(report: WorkerReport, expected: Mapping[str, Expected]) -> WorkerVerdict:
    """Whether `report` (a final one) shows every row of every stream in
    `expected`, in order, and nothing else."""
    if report.kind != "final":
        return WorkerVerdict(report.worker, (), "sent no final report")
    checks = tuple(_check_stream(report, s, e) for s, e in expected.items())
    return WorkerVerdict(report.worker, checks)


async def expected_for(
    writer: WriterInstance,
    report: WorkerReport,
    cache: dict[tuple[str, int], Digest],
) -> dict[str, Expected]:
    """What `report`'s worker must hold, computed from the writer's store.

    A worker that never got a POSITION for a stream has no start: it is
    expected to have everything from the beginning, which it won't.
    """
    expected: dict[str, Expected] = {}
    instance = writer.instance_name
    for stream_name in DEMO_STREAMS:
        stream = writer.streams[stream_name]
        token = stream.current_token(instance)
        if stream_name not in PERSISTED_STREAMS:
            state = normalize_typing(writer.typing.typing_state())
            expected[stream_name] = Expected(token, typing=state)
            continue
        start = report.start.get(stream_name, 0)
        key = (stream_name, start)
        if key not in cache:
            digest = await digest_from_source(
                type(stream), stream.update_function, instance, start, token
            )
            cache[key] = digest.value()
        expected[stream_name] = Expected(token, cache[key])
    return expected


# -- the demo


@attrs.frozen(kw_only=True)
class DemoOptions:
    """What ``synapse-replication demo`` was asked for (see `cli`)."""

    duration_s: float = 10.0
    rate: float = 2000.0
    workers: int = 2
    seed: int | None = None
    directory: str | None = None
    verbose: bool = False
    # Halfway through the load, the last worker drops its connection.
    disconnect: bool = True
    # None: whether stdout is a terminal.
    tty: bool | None = None


def _worker_command(
    name: str, options: DemoOptions, db_path: str, replication_port: int, http_port: int
) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "synapse_replication.cli",
        "demo-worker",
        "--name",
        name,
        "--writer-host",
        "127.0.0.1",
        "--writer-port",
        str(replication_port),
        "--writer-name",
        WRITER_NAME,
        "--server-name",
        SERVER_NAME,
        "--http-port",
        str(http_port),
        "--db",
        db_path,
    ]
    if options.verbose:
        args.append("--verbose")
    return args


class _Demo:
    """One run of the demo; `run` returns the exit code, `cleanup` undoes
    everything `run` set up, however far it got."""

    def __init__(self, reactor: Any, options: DemoOptions, out: IO[str], err: IO[str]) -> None:
        self.reactor = reactor
        self.options = options
        self.out = out
        self.err = err
        self.seed = (
            options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
        )
        self.own_directory = options.directory is None
        self.directory: str | None = None
        self.writer: WriterInstance | None = None
        self.http_port: IListeningPort | None = None
        self.workers: list[WorkerProcess] = []
        self.load: LoadGenerator | None = None
        self.phase = "starting"
        self.phase_started = 0.0
        self.phase_total_s: float | None = None
        self._ticker: LoopingCall | None = None
        self._display = ProgressDisplay(
            out, out.isatty() if options.tty is None else options.tty
        )
        self._last_sample: tuple[float, dict[str, int]] | None = None
        self._disconnect_call: IDelayedCall | None = None
        # Digests of the writer's rows, by (stream, from token).
        self._digests: dict[tuple[str, int], Digest] = {}

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _stderr_line(self, line: str) -> None:
        self.err.write(line + "\n")
        self.err.flush()

    # -- setup

    async def _start(self) -> WriterInstance:
        options = self.options
        try:
            if options.directory is None:
                self.directory = tempfile.mkdtemp(prefix="synapse-replication-demo-")
            else:
                self.directory = options.directory
                os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise DemoError(f"could not create the database directory: {e}") from e
        db_path = os.path.join(self.directory, DB_FILE_NAME)
        try:
            writer = await start_writer(
                self.reactor, db_path=db_path, instance_name=WRITER_NAME, server_name=SERVER_NAME
            )
        except Exception as e:
            raise DemoError(f"could not start the writer on {db_path}: {e}") from e
        self.writer = writer
        self.load = LoadGenerator(writer, random.Random(self.seed), self.reactor)
        await self.load.prepare()
        secret = secrets.token_urlsafe(32)
        resource = ReplicationHttpResource(
            instance_name=WRITER_NAME,
            streams={TypingStream.NAME: writer.streams[TypingStream.NAME]},
            secret=secret,
            clock=self.reactor,
        )
        self.http_port = listen_http(self.reactor, 0, make_replication_site(resource))
        address = self.http_port.getHost()
        assert isinstance(address, IPv4Address)
        http_port = address.port
        self.say(
            f"Writer {WRITER_NAME!r} ({SERVER_NAME}): replication on "
            f"127.0.0.1:{writer.listening_port()}, HTTP catch-up on 127.0.0.1:{http_port}, "
            f"database {db_path}" + (" (removed at the end)" if self.own_directory else "")
        )
        env = dict(os.environ)
        env[SECRET_ENV] = secret
        for i in range(options.workers):
            name = f"worker{i + 1}"
            process = WorkerProcess(name, self.reactor, self._stderr_line)
            command = _worker_command(name, options, db_path, writer.listening_port(), http_port)
            self.reactor.spawnProcess(process, command[0], command, env=env)
            self.workers.append(process)
        return writer

    def _check_workers_alive(self) -> None:
        for worker in self.workers:
            if not worker.running:
                raise DemoError(f"{worker.name} exited ({worker.exit_status}) before the load")

    def _all_connected(self, writer: WriterInstance) -> bool:
        self._check_workers_alive()
        if len(writer.handler.connections()) < len(self.workers):
            return False
        return all(
            w.latest is not None
            and w.latest.connected
            and all(w.latest.positions.get(s) is not None for s in DEMO_STREAMS)
            for w in self.workers
        )

    async def _wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = self.reactor.seconds() + timeout_s
        while not predicate():
            if self.reactor.seconds() >= deadline:
                return False
            await _sleep(self.reactor, 0.05)
        return True

    # -- progress

    def _set_phase(self, phase: str, total_s: float | None = None) -> None:
        self.phase = phase
        self.phase_total_s = total_s
        self.phase_started = self.reactor.seconds()

    def _writer_tokens(self, writer: WriterInstance) -> dict[str, int]:
        return {
            name: writer.streams[name].current_token(writer.instance_name)
            for name in DEMO_STREAMS
        }

    def snapshot(self) -> ProgressSnapshot:
        writer = self.writer
        assert writer is not None
        now = self.reactor.seconds()
        written = {
            name: self.load.rows_written(name) if self.load is not None else 0
            for name in DEMO_STREAMS
        }
        writer_rates: dict[str, float] = {}
        if self._last_sample is not None:
            then, before = self._last_sample
            if now > then:
                writer_rates = {n: (written[n] - before[n]) / (now - then) for n in DEMO_STREAMS}
        self._last_sample = (now, written)
        tokens = self._writer_tokens(writer)
        workers = []
        for worker in self.workers:
            report = worker.latest
            if not worker.running:
                status = f"exited ({worker.exit_status})"
            elif report is not None and report.connected:
                status = "connected"
            else:
                status = "connecting"
            note = ""
            if report is not None and report.disconnects:
                caught_up = sum(report.fetched.values())
                note = f"dropped {report.disconnects}x, caught up {caught_up:,} rows"
            lags: dict[str, int | None] = {}
            for name in DEMO_STREAMS:
                position = report.positions.get(name) if report is not None else None
                lags[name] = None if position is None else tokens[name] - position
            rates = worker.rates() if worker.running else {}
            workers.append(WorkerProgress(worker.name, status, rates, lags, note))
        return ProgressSnapshot(
            phase=self.phase,
            elapsed_s=now - self.phase_started,
            phase_total_s=self.phase_total_s,
            writer_rates=writer_rates,
            writer_tokens=tokens,
            workers=tuple(workers),
        )

    def _tick(self) -> None:
        self._display.show(self.snapshot())

    def _start_ticker(self) -> None:
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self.reactor
        self._ticker.start(1.0, now=False).addErrback(
            lambda f: _log.failure("Progress display failed", f)
        )

    def _stop_ticker(self) -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None

    # -- the run

    async def run(self) -> int:
        options = self.options
        writer = await self._start()
        if not await self._wait_until(lambda: self._all_connected(writer), CONNECT_TIMEOUT_S):
            raise DemoError(
                f"the workers did not all connect within {CONNECT_TIMEOUT_S:g}s "
                f"({len(writer.handler.connections())} of {len(self.workers)} connected)"
            )
        self.say(
            f"{len(self.workers)} workers connected. Writing for {options.duration_s:g}s "
            f"at about {options.rate:,.0f} rows/s (seed {self.seed})."
        )
        if not self._display.tty:
            self.say("Rates and lags per stream are events/receipts/typing.")
        load = self.load
        assert load is not None
        start_rows = {name: load.rows_written(name) for name in DEMO_STREAMS}
        self._set_phase("load", options.duration_s)
        self._last_sample = (self.reactor.seconds(), dict.fromkeys(DEMO_STREAMS, 0))
        self._start_ticker()
        if options.disconnect and self.workers:
            self._disconnect_call = self.reactor.callLater(
                options.duration_s / 2, self._disconnect, self.workers[-1]
            )
        load_started = self.reactor.seconds()
        try:
            await load.run(options.duration_s, options.rate)
        except CancelledError:
            raise
        except Exception as e:
            _log.failure("The load failed")
            raise DemoError(f"writing the load failed: {e!r}") from e
        load_time = self.reactor.seconds() - load_started
        # Freeze typing (no more timeouts) so that there is a final state to compare.
        writer.typing.stop()
        self._set_phase("drain")
        caught_up = await self._wait_until(lambda: self._caught_up(writer), CATCH_UP_TIMEOUT_S)
        self._stop_ticker()
        self._tick()
        if not caught_up:
            self.say(f"Some workers did not catch up within {CATCH_UP_TIMEOUT_S:g}s.")
        verdicts = await self._final_check(writer)
        counts = {name: load.rows_written(name) - start_rows[name] for name in DEMO_STREAMS}
        self._summary(counts, load_time, verdicts)
        return EXIT_OK if all(v.ok for v in verdicts) else EXIT_MISMATCH

    def _disconnect(self, worker: WorkerProcess) -> None:
        self._disconnect_call = None
        worker.request_disconnect()
        self._display.note(
            f"{worker.name} drops its replication connection on purpose: it reconnects "
            "and catches up (events and receipts from SQLite, typing over HTTP)."
        )

    def _caught_up(self, writer: WriterInstance) -> bool:
        tokens = self._writer_tokens(writer)
        for worker in self.workers:
            if not worker.running:
                continue
            report = worker.latest
            if report is None:
                return False
            for name, token in tokens.items():
                position = report.positions.get(name)
                if position is None or position < token:
                    return False
        return True

    async def _final_check(self, writer: WriterInstance) -> list[WorkerVerdict]:
        """Ask every worker for its final report and compare it with what the
        writer says it should hold."""
        for worker in self.workers:
            worker.request_final()
        verdicts = []
        for worker in self.workers:
            try:
                report = await _with_timeout(
                    self.reactor,
                    worker.wait_final(),
                    FINAL_REPORT_TIMEOUT_S,
                    f"waiting for the final report of {worker.name}",
                )
            except DemoError as e:
                verdicts.append(WorkerVerdict(worker.name, (), str(e)))
                continue
            if report is None:
                problem = f"exited ({worker.exit_status}) without its final report"
                verdicts.append(WorkerVerdict(worker.name, (), problem))
                continue
            expected = await expected_for(writer, report, self._digests)
            verdicts.append(compare_worker(report, expected))
        return verdicts

    def _summary(
        self, counts: Mapping[str, int], load_time: float, verdicts: Sequence[WorkerVerdict]
    ) -> None:
        assert self.load is not None
        self.say("")
        self.say(f"Summary: {load_time:.1f}s of load, seed {self.seed}")
        self.say(f"  {'stream':<10}{'rows written':>14}{'rows/s':>10}")
        for name in DEMO_STREAMS:
            rate = counts[name] / load_time if load_time > 0 else 0.0
            self.say(f"  {name:<10}{counts[name]:>14,}{rate:>10,.0f}")
        actions = ", ".join(f"{n} {c}" for n, c in sorted(self.load.actions.items()))
        self.say(f"  load: {len(self.load.rooms)} rooms; actions: {actions}")
        for verdict in verdicts:
            status = "OK" if verdict.ok else "MISMATCH"
            self.say(f"  {verdict.worker:<10}{status:<9} {verdict.describe()}")
        for worker in self.workers:
            report = worker.final_report or worker.latest
            if report is not None and report.disconnects:
                self.say(f"  {worker.name} {describe_catch_up(report)}")
        failed = [v for v in verdicts if not v.ok]
        if not failed:
            who = "the worker has" if len(verdicts) == 1 else f"all {len(verdicts)} workers have"
            self.say(
                f"OK: {who} every row of every stream, in order, and the writer's typing state."
            )
        else:
            names = ", ".join(v.worker for v in failed)
            self.say(
                f"MISMATCH: {len(failed)} of {len(verdicts)} workers ({names}) did not "
                "receive exactly the writer's rows."
            )

    # -- cleanup

    async def cleanup(self) -> None:
        """Stop the workers (killing those that do not exit), the listeners
        and the writer, and remove the temporary directory."""
        self._stop_ticker()
        if self._disconnect_call is not None and self._disconnect_call.active():
            self._disconnect_call.cancel()
        running = [w for w in self.workers if w.running]
        for worker in running:
            worker.request_final()
        if running:
            await self._wait_until(
                lambda: not any(w.running for w in running), WORKER_EXIT_TIMEOUT_S
            )
        for worker in running:
            worker.kill()
        if running:
            await self._wait_until(lambda: not any(w.running for w in running), 5.0)
        if self.http_port is not None:
            stopped = self.http_port.stopListening()
            self.http_port = None
            if stopped is not None:
                await stopped
        if self.writer is not None:
            writer, self.writer = self.writer, None
            await writer.stop()
        if self.own_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


async def run_demo(
    reactor: Any, options: DemoOptions, out: IO[str] | None = None, err: IO[str] | None = None
) -> int:
    """Run the demo; the exit code: `EXIT_OK` if every worker has every row,
    `EXIT_MISMATCH` if not, `EXIT_SETUP_FAILED` if it could not get that far.
    Everything it started is stopped and removed, also when it is cancelled."""
    demo = _Demo(reactor, options, out or sys.stdout, err or sys.stderr)
    try:
        return await demo.run()
    except DemoError as e:
        demo.say(f"Demo failed: {e}")
        return e.exit_code
    except CancelledError:
        demo.say("Interrupted: stopping the workers and the writer.")
        raise
    except Exception as e:
        # A bug: the traceback goes to the log (stderr).
        _log.failure("The demo failed")
        demo.say(f"Demo failed: unexpected error {e!r}")
        return EXIT_SETUP_FAILED
    finally:
        await demo.cleanup()
